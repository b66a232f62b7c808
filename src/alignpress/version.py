"""alignpress's version and, in a git checkout, the commit it runs from (for --version and the card)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def version() -> str:
    try:
        return importlib.metadata.version("alignpress")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        import tomllib

        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def git_commit() -> str | None:
    """The checkout's commit, with `-dirty` when tracked files differ from it; None outside git."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")
