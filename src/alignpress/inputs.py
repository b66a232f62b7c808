"""The local files a run reads, recorded when prepare reads them and checked before a later command
uses the folder's results: a data file edited since prepare (a `run` used to skip every stage and
report the old numbers), or a local base model overwritten since (a resumed training continued an
adapter trained on other weights, and export merged it into them).

Recorded in run.json `inputs`: {"data": {path: file}, "model": {"folder": path, "files": {name: file}}}
with file = {size, mtime_ns, sha256}. A file whose size and mtime are as recorded is taken as unchanged;
otherwise its sha256 decides (a copy with new mtimes is the same file, and its record takes the new
mtime so later commands do not hash it again). Hub datasets and models are
not recorded: a Hub model is pinned by its revision, and builtin models are alignpress's own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import AlignpressError
from .recipe import Recipe, data_sources
from .runstate import STAGES, RunDir, file_sha256

log = logging.getLogger("alignpress")


def _file(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def local_data_files(recipe: Recipe) -> list[Path]:
    from .prepare import local_data_files as source_files

    out = []
    for prefix, src in data_sources(recipe.data):
        found = source_files(recipe, src, prefix, src.split, f"{prefix}.split")
        if found is not None:
            out += [Path(f) for f in found[2]]
    return out


def local_model_folder(recipe: Recipe, path: str) -> Path | None:
    """The base model's folder when the recipe names one on this machine (not builtin, not the Hub)."""
    if recipe.model.name_or_path.startswith("builtin:") or not Path(path).is_dir():
        return None
    return Path(path)


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def record(recipe: Recipe, run_dir: RunDir, model_path: str) -> None:
    """After prepare: what the run read, for `check`."""
    entry: dict[str, Any] = {"data": {str(p): _file(p) for p in local_data_files(recipe)}}
    folder = local_model_folder(recipe, model_path)
    if folder is not None:
        entry["model"] = {"folder": str(folder), "files": {p.name: _file(p) for p in model_files(folder)}}
    run_dir.update(inputs=entry)


def _changed(path: Path, was: dict[str, Any]) -> bool:
    """Whether the file differs from its record. A copy with other mtimes and the same bytes does not,
    and its record takes the new mtime (`was` is updated), so the next command does not hash it again."""
    if not path.is_file():
        return True
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) == (was["size"], was["mtime_ns"]):
        return False
    if st.st_size != was["size"] or file_sha256(path) != was["sha256"]:
        return True
    was["mtime_ns"] = st.st_mtime_ns
    return False


def changed_data(run_dir: RunDir, inputs: dict[str, Any] | None = None) -> list[str]:
    recorded = ((run_dir.load().get("inputs") if inputs is None else inputs) or {}).get("data") or {}
    return [p for p, was in recorded.items() if _changed(Path(p), was)]


def changed_model(run_dir: RunDir, inputs: dict[str, Any] | None = None) -> list[str]:
    recorded = ((run_dir.load().get("inputs") if inputs is None else inputs) or {}).get("model")
    if not recorded:
        return []
    folder = Path(recorded["folder"])
    now = {p.name for p in model_files(folder)} if folder.is_dir() else set()
    gone_or_new = sorted(now ^ set(recorded["files"]))
    return gone_or_new + [n for n, was in recorded["files"].items() if n in now and _changed(folder / n, was)]


def check(recipe: Recipe, run_dir: RunDir, command: str, redo_from: str | None = None) -> None:
    """Refuse (exit 2) a command that would use results of inputs changed since prepare read them.
    `redo_from`: the first stage a recipe change will send back to pending (it runs again too)."""
    if not run_dir.is_done("prepare"):
        return  # prepare reads them afresh
    again = STAGES[STAGES.index(redo_from):] if redo_from else ()
    stages_left = [s for s in ("train", "evaluate", "export") if not run_dir.is_done(s) or s in again]
    inputs = run_dir.load().get("inputs") or {}
    before = json.dumps(inputs, sort_keys=True)
    try:
        _check(recipe, run_dir, command, inputs, stages_left)
    finally:
        if run_dir.writer and json.dumps(inputs, sort_keys=True) != before:
            run_dir.update(inputs=inputs)  # the new mtimes of files whose bytes are the same


def _check(recipe: Recipe, run_dir: RunDir, command: str, inputs: dict[str, Any], stages_left: list[str]) -> None:
    if command in ("run", "train") and (files := changed_data(run_dir, inputs)):
        field = "data.dataset" if recipe.data.dataset else "data.datasets"
        raise AlignpressError(
            f"{', '.join(files[:3])}{' and more' if len(files) > 3 else ''} changed since this folder's prepare stage read "
            f"{'it' if len(files) == 1 else 'them'}: its results are of the old data. Run `entrypoint.py prepare` on this folder to prepare "
            "the new data (training then starts over), use another --output-dir, or put the old file back",
            source=recipe.where(field), field=field)
    uses_model = command in ("train", "evaluate", "export") or (command == "run" and stages_left)
    if uses_model and (files := changed_model(run_dir, inputs)):
        raise AlignpressError(
            f"the base model's files changed since this folder's run began ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''} in "
            f"{(run_dir.load().get('inputs') or {})['model']['folder']}): its checkpoints and adapter were trained on the old weights. "
            "Put them back, or `run --restart` to train on the new ones (or use another --output-dir)",
            source=recipe.where("model.name_or_path"), field="model.name_or_path")
