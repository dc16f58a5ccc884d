"""AITBC shared core: keys and signing, addresses, config, logging, gRPC plumbing."""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    # The installed distribution's version; a bare checkout on PYTHONPATH
    # (the GPU check, a copied tree) says so rather than guessing.
    try:
        return metadata.version("aitbc")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


__version__ = _version()
