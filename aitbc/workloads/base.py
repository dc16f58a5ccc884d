"""The workload interface: what the coordinator and the miner must agree on.

A workload is a module in this package with one `Workload` subclass: its
parameters (validated on submit), the coordinator's own measure of the work
(what the price table charges for), the largest output a correct run can
have, the check every output gets, and how two miners' outputs are compared
when a job is run redundantly. The torch code that runs it is the miner's
(miner_svc/_run_*.py); the coordinator never imports it. Adding a workload
touches no scheduler or ledger code.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from aitbc.errors import InvalidArgument
from aitbc.v1 import coordinator_pb2

P = TypeVar("P")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    # Largest error seen, as a fraction of its tolerance (< 1 passes).
    worst_ratio: float = 0.0


class Workload(ABC, Generic[P]):
    # The JobSpec oneof field.
    name: ClassVar[str]
    # What work_units() counts, for the price table and the docs.
    unit: ClassVar[str]
    # True when check() proves an output correct on its own (matmul's
    # Freivalds); else correctness needs other miners' runs to compare.
    self_checking: ClassVar[bool] = False
    # The spec field that sets the output's size, named when a coordinator
    # refuses a job whose result would be larger than it takes.
    size_field: ClassVar[str] = "spec"

    @abstractmethod
    def params(self, spec: coordinator_pb2.JobSpec) -> P:
        """The validated parameters; raises InvalidArgument."""

    def model(self, params: P) -> str:
        """The model the job needs a miner to hold; "" for none."""
        return ""

    # Seconds one of work_units() takes on a slow device of each kind: what
    # the coordinator's run-time bound for a job is a multiple of, never
    # its price. Slow on purpose (an old CPU, a small GPU, a large model):
    # an honest run cut short is lost work, a cheat held longer only waits.
    cpu_secs_per_unit: ClassVar[float] = 1.0
    gpu_secs_per_unit: ClassVar[float] = 0.1

    def run_seconds(self, params: P, gpu: bool) -> float:
        """How long an honest run of the job takes, at most, on a slow CPU
        or CUDA GPU."""
        return self.work_units(params) * (self.gpu_secs_per_unit if gpu else self.cpu_secs_per_unit)

    @abstractmethod
    def work_units(self, params: P) -> int:
        """The coordinator's own measure of the work: never the miner's."""

    @abstractmethod
    def max_output_size(self, params: P) -> int:
        """Uploads beyond this many bytes are refused mid-stream."""

    def exact_output_size(self, params: P) -> int | None:
        """The one size a correct output has, where the spec fixes it: an
        upload of any other size is refused before it is read."""
        return None

    def check_memory(self, params: P, size: int) -> int:
        """Most bytes check_file() and agree_files() hold at once for an
        output of `size` bytes: what the coordinator's check budget counts.
        By default they read outputs whole and parse them (a few copies)."""
        return 8 * size + 2**20

    @abstractmethod
    def check(self, params: P, output: bytes) -> Check:
        """What every output must pass (form, sizes, and for self-checking
        workloads, correctness)."""

    def check_file(self, params: P, path: Path) -> Check:
        """check() of an output on disk; workloads with large outputs stream it."""
        return self.check(params, path.read_bytes())

    @abstractmethod
    def agree(self, params: P, a: bytes, b: bytes) -> Check:
        """Whether two outputs that each passed check() are the same result."""

    def agree_files(self, params: P, a: Path, b: Path) -> Check:
        return self.agree(params, a.read_bytes(), b.read_bytes())


def check_text(value: str, field: str, *, max_bytes: int, allow_empty: bool = False) -> str:
    size = len(value.encode())
    if size == 0 and not allow_empty:
        raise InvalidArgument(f"{field} must not be empty", field=field)
    if size > max_bytes:
        raise InvalidArgument(f"{field} is {size} bytes, above the limit of {max_bytes}", field=field)
    return value


def check_range(value: float, field: str, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be in {low:g}..{high:g}, got {value:g}", field=field)


def check_model_name(value: str, field: str) -> str:
    if not MODEL_NAME.fullmatch(value):
        raise InvalidArgument(
            f"{field} must name a model (letters, digits, '.', '_', '-'; at most 64), got {value!r}", field=field
        )
    return value


def parse_output(message_type: type[Any], output: bytes) -> Any:
    """Parse an output message; None if it is not one."""
    from google.protobuf.message import DecodeError

    try:
        return message_type.FromString(output)
    except (DecodeError, ValueError):
        return None
