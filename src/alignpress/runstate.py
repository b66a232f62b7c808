"""The output folder and its manifest, run.json.

A stage is finished only when run.json says `done`; a stage writes into `<name>.partial/` and
renames it into place just before it is marked done, so a crash never leaves a folder that
looks finished. run.json is replaced atomically on every update.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import AlignpressError, redact

log = logging.getLogger("alignpress")

STAGES = ("prepare", "train", "evaluate", "export", "publish")
LIBRARIES = ("alignpress", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "deepspeed", "bitsandbytes", "tokenizers", "safetensors")


def duration_text(seconds: float) -> str:
    """`4.3 s`, `2 min 05 s`, `1 h 58 min`: what a log line says of a time."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def default_output_dir(recipe_name: str) -> Path:
    """Where a recipe's run goes without --output-dir: outputs/NAME, under ALIGNPRESS_OUTPUTS when set
    (the image sets /outputs, its volume: a run there outlives the container)."""
    return Path(os.environ.get("ALIGNPRESS_OUTPUTS") or "outputs") / recipe_name


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader sees the old file or the new one, never half of one)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically through a temporary file that a failure never leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a stray temporary file
        raise


# torch.save's C++ writer reports a short write in its own words ("unexpected pos 8512 vs 8406",
# "PytorchStreamWriter failed writing file"), without errno; such an error on a nearly full disk is one.
# torch.save reports a full disk without an errno: as a zip writer failure, or as a failed C++ stream.
WRITER_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed", "basic_ios::clear", "iostream error")
LOW_SPACE = 64 << 20


def disk_full(error: BaseException | None, folder: Path | None = None) -> bool:
    """True when `error` (or one it was raised from) is a full disk (ENOSPC or EDQUOT), or a
    torch writer failure while `folder`'s disk has less than 64 MB left."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if folder is not None and any(w in text for w in WRITER_FAILURES):
            try:
                return shutil.disk_usage(folder).free < LOW_SPACE
            except OSError:
                return False
        error = error.__cause__ or error.__context__
        seen += 1
    return False


class DiskFull(AlignpressError):
    """The output folder's disk filled up: not bad input, so exit 1 like other runtime failures."""

    exit_code = 1


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def written(folder: Path) -> str:
    """'model.partial' or 'checkpoint-20 (0.7 MB written)': what a full disk interrupted."""
    size = folder_size(folder)
    return f"{folder.name} ({_mb(size)} written)" if size >= 50_000 else folder.name


def disk_full_message(root: Path, removed: list[str]) -> DiskFull:
    where = f" while writing {', '.join(removed)}; removed it, " if removed else "; "
    return DiskFull(f"no space left on device{where}{space_left(root)} now; free some space, then run the same command again to resume", source=str(root))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def space_left(folder: Path) -> str:
    """'0.0 MB free of 1.0 MB' for the disk holding `folder`."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{_mb(usage.free)} free of {_mb(usage.total)}"


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_run_id(recipe_name: str) -> str:
    return f"{recipe_name}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def owned_run_ids(manifest: dict[str, Any]) -> list[str]:
    """This folder's run id and the ids it had before each --restart (newest first)."""
    return [i for i in [manifest.get("run_id"), *manifest.get("previous_run_ids", [])] if i]


class RunDir:
    """The output folder of one recipe run."""

    def __init__(self, root: str | Path, writer: bool = True):
        self.root = Path(root)
        self.manifest_path = self.root / "run.json"
        # Under a multi-process launch only the main process writes the manifest.
        self.writer = writer

    # Layout, documented in the README
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def full(self) -> Path:
        return self.root / "full"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def ensure_writable(self) -> None:
        for folder in (self.root, *self.root.parents):
            if folder.exists():
                if not folder.is_dir():
                    what = "is a file" if folder == self.root else f"cannot be made: {folder} is a file"
                    raise AlignpressError(f"output folder {what}, not a folder; give --output-dir a folder", source=str(self.root))
                break
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise AlignpressError(f"output folder is not writable: {e.strerror or e}", source=str(self.root)) from None

    # Manifest
    def load(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise AlignpressError(f"run.json is not valid JSON ({e}); move it away to start over", source=str(self.manifest_path)) from None

    def save(self, manifest: dict[str, Any]) -> None:
        if self.writer:
            write_json(self.manifest_path, manifest)

    def update(self, **fields: Any) -> dict[str, Any]:
        m = self.load()
        m.update(fields)
        self.save(m)
        return m

    def new_run_id(self) -> str:
        """A redo (--restart) is a new run: a new id, so its push gets a tag of its own and its
        tracker a run of its own. The earlier ids stay in previous_run_ids: the Hub repos those
        runs published are still this folder's to update (owned_run_ids)."""
        m = self.load()
        if m.get("run_id"):
            m["previous_run_ids"] = [m["run_id"], *m.get("previous_run_ids", [])]
        m["run_id"] = new_run_id(m.get("recipe", self.root.name))
        m.pop("tracking", None)  # the tracked run follows the run id
        self.save(m)
        return m["run_id"]

    def init(self, recipe_name: str, recipe_file: str) -> dict[str, Any]:
        m = self.load()
        if not m:
            m = {
                "run_id": new_run_id(recipe_name),
                "recipe": recipe_name,
                "recipe_file": recipe_file,
                "created": now(),
                "stages": {s: {"status": "pending"} for s in STAGES},
                "warnings": [],
            }
        m["versions"] = library_versions()
        self.save(m)
        return m

    def status(self, stage: str) -> str:
        return self.load().get("stages", {}).get(stage, {}).get("status", "pending")

    def is_done(self, stage: str) -> bool:
        return self.status(stage) == "done"

    def set_stage(self, stage: str, **fields: Any) -> None:
        m = self.load()
        m.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        self.save(m)

    def invalidate_from(self, stage: str) -> None:
        """Mark `stage` and every later stage pending (their inputs changed)."""
        m = self.load()
        later = STAGES[STAGES.index(stage):]
        for s in later:
            m.setdefault("stages", {})[s] = {"status": "pending"}
        self.save(m)

    def warn(self, message: str) -> None:
        m = self.load()
        if message not in m.setdefault("warnings", []):
            m["warnings"].append(message)
            self.save(m)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a stage: marks it running, then done with its timing, or failed with the error."""
        started = time.time()
        m = self.load()
        m.setdefault("stages", {})[name] = {"status": "running", "started": now()}  # drop a previous attempt's results
        self.save(m)
        info: dict[str, Any] = {}
        try:
            yield info
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", None) in (129, 130, 143) else "failed"
            error = self.disk_full_error() if not isinstance(e, DiskFull) and disk_full(e, self.root) else e
            try:
                self.set_stage(name, status=status, finished=now(), seconds=round(time.time() - started, 2), error=redact(str(error))[:2000])
            except OSError as write_error:
                # Even run.json cannot be written (a full disk): it still says `running`, which a re-run
                # treats as not done, so the state stays consistent. Report the first error, not this one.
                log.warning("could not mark stage %s %s in %s: %s", name, status, self.manifest_path, write_error.strerror or write_error)
            if error is not e:
                raise error from e
            raise
        self.set_stage(name, status="done", finished=now(), seconds=round(time.time() - started, 2), **info)

    def disk_full_error(self) -> DiskFull:
        """The one-line error for a full disk. Unfinished scratch folders (`NAME.partial`) are
        removed first: they are never finished work, and the room lets run.json be written."""
        parts = []
        for p in sorted(self.root.glob("*.partial")):
            parts.append(written(p))
            shutil.rmtree(p, ignore_errors=True)
        return disk_full_message(self.root, parts)

    # Results kept until their replacement is finished (`--restart`)
    def set_aside(self, path: Path) -> None:
        """Move `path` to `path.previous` so a redo starts without it but nothing finished is lost
        if the redo fails; `drop_aside` removes it once the redo is done. An existing `.previous`
        is the older, finished one: it is kept and `path` (an unfinished redo's) is dropped."""
        if not path.exists():
            return
        aside = path.with_name(path.name + ".previous")
        if aside.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            os.replace(path, aside)

    def drop_aside(self, path: Path) -> None:
        aside = path.with_name(path.name + ".previous")
        if aside.is_dir():
            shutil.rmtree(aside)
        elif aside.exists():
            aside.unlink()

    # Staged folders
    def partial(self, final: Path) -> Path:
        """A fresh scratch folder to build `final` in."""
        tmp = final.with_name(final.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, final: Path) -> None:
        """Move a finished scratch folder into place, replacing an older one."""
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
