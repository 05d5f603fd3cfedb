"""Versions of installed distributions, as their package metadata records them.

Not `module.__version__`: megatron-core computes its own from `git rev-parse` in its folder, which inside a
venv that lives in a git checkout (this repository's .venv) reads `0.19.2+<that checkout's commit>`.
"""
import importlib.metadata


def installed_version(distribution: str) -> str:
    """e.g. installed_version("megatron-core") -> "0.19.2"; "not installed" when it is not."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
