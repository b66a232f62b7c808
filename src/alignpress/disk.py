"""Disk space: what training and export will write, checked before they start.

A disk too small for a run used to be found when it filled: hours into training (a full
fine-tune's checkpoints hold the weights and two Adam moments each), or at export. The failure
itself is handled (runstate.disk_full: one line, nothing finished lost, resumable), but the GPU
time before it is paid for. So `run`, `train`, `evaluate` and `export` first add up what the stages
still to run will write, per filesystem, and refuse (exit 2, one line) when it is more than the free space.

Every part is a lower bound, so a run that would fit is never refused:
- the base model's download into the Hub cache (when it is a Hub model not cached yet): its
  weights at the dtype its config states;
- the checkpoints: the trained weights (the LoRA adapter, or every weight) and the optimizer's
  states (Adam's two moments in the weights' dtype; one byte each for 8-bit optimizers; DeepSpeed's
  fp32 master copy and moments, 12 bytes a weight), at most `train.save_total_limit` of them plus
  one while the oldest is rotated out, and no more than the saves the run makes; tokenizer files,
  RNG and trainer state are not counted;
- the trained adapter or full weights (train's `adapter/` or `full/`), and the merged model in
  `export.dtype` (export writes `model.partial` beside the old `model/`);
- the judge's download (`eval.judge`, a Hub model not cached yet), which evaluate loads.
Checkpoints already in the folder count as written. Before prepare has run the number of pairs is
unknown and one save is counted; `run` checks again when prepare is done.

A bucket mounted by rclone with a write cache (SkyPilot's MOUNT_CACHED, which the sky/ tasks use)
keeps what is written in its cache (~/.cache/rclone) until it is uploaded: that disk is checked.
A folder on another FUSE mount (gcsfuse, mountpoint-s3, blobfuse) is not checked: such a mount
reports a free space that means nothing. ALIGNPRESS_SKIP_DISK_CHECK=1 skips the check (a
filesystem whose free space misleads, such as one that compresses).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AlignpressError
from .recipe import Recipe
from .runstate import RunDir, folder_size

SKIP_ENV = "ALIGNPRESS_SKIP_DISK_CHECK"
log = logging.getLogger("alignpress")


def size_text(n: float) -> str:
    """Binary units, as the full-disk message writes them: '0.7 MB', '7.1 GB'."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


# Optimizer states per trained weight, by transformers' OptimizerNames: how many, and the bytes of
# each (None: the weight's dtype). Factored, low-rank or stateless ones (NO_STATE) count none.
OPTIMIZER_STATES: dict[str, tuple[int, float | None]] = {
    **dict.fromkeys(("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision", "paged_adamw_32bit",
                     "grokadamw", "stable_adamw", "schedule_free_adamw", "schedule_free_radam"), (2, None)),
    **dict.fromkeys(("adamw_torch_8bit", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"), (2, 1)),
    "adamw_torch_4bit": (2, 0.5),
    **dict.fromkeys(("ademamix", "paged_ademamix_32bit"), (3, None)),
    **dict.fromkeys(("ademamix_8bit", "paged_ademamix_8bit"), (3, 1)),
    **dict.fromkeys(("lion_32bit", "paged_lion_32bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_32bit", "adagrad"), (1, None)),
    **dict.fromkeys(("lion_8bit", "paged_lion_8bit", "rmsprop_bnb_8bit"), (1, 1)),
}
NO_STATE = ("sgd", "schedule_free_sgd", "adafactor", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
            "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw", "apollo_adamw_layerwise", "lomo", "adalomo")


def optimizer_state_bytes(optim: str, weight_bytes: int) -> float:
    """Bytes of optimizer state per trained weight, at least (a name not listed counts none)."""
    count, each = OPTIMIZER_STATES.get(optim, (0, None))
    return count * (weight_bytes if each is None else each)


def accelerate_settings(recipe: Recipe) -> dict:
    """The recipe's accelerate config (train.accelerate_config) as a mapping; {} without one."""
    if not recipe.train.accelerate_config:
        return {}
    import yaml

    from .recipe import accelerate_config_path

    return yaml.safe_load(Path(accelerate_config_path(recipe)).read_text()) or {}


def deepspeed_stage(recipe: Recipe) -> int | None:
    """The ZeRO stage of the recipe's accelerate config, or None without DeepSpeed."""
    config = accelerate_settings(recipe)
    if str(config.get("distributed_type", "")).upper() != "DEEPSPEED":
        return None
    return int((config.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)


def full_weights_in_fp32(recipe: Recipe) -> bool:
    """A full fine-tune without DeepSpeed holds its weights in float32 and computes in model.dtype under
    autocast (the Trainer's bf16): in bf16 weights, an Adam step of lr 5e-6 is below half the rounding
    step of a weight of 0.02 (6e-5) and is lost (measured on the demo's tiny Phi-3, mean |w| 0.022: 4 steps
    at lr 5e-6 changed 5.5% of the bf16 weights, 99.99% of the float32 ones). DeepSpeed keeps float32 master weights itself; LoRA's
    adapters are float32 (peft upcasts them)."""
    return not recipe.lora.enabled and deepspeed_stage(recipe) is None


@dataclass
class Writes:
    """What the remaining stages write into one folder: (description, bytes) parts and the need."""

    folder: Path
    parts: list[str] = field(default_factory=list)
    need: float = 0.0


def _hub_weights_cached(repo: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        found = try_to_load_from_cache(repo, name, revision=revision)
        return found if isinstance(found, str) else None

    if index := cached("model.safetensors.index.json"):
        shards = set(json.loads(Path(index).read_text()).get("weight_map", {}).values())
        return all(cached(s) for s in shards)
    return bool(cached("model.safetensors") or cached("pytorch_model.bin"))


def prepared_pairs(run_dir: RunDir) -> int | None:
    """The training pairs prepare wrote (data/train.jsonl, a line each), or None before prepare has run."""
    try:
        with open(run_dir.data / "train.jsonl", "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def optimizer_steps(recipe: Recipe, pairs: int | None) -> int | None:
    """Steps the Trainer will run (its own arithmetic), or None when the pairs are not known yet."""
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    if pairs is None:
        return None
    world = t.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(math.ceil(pairs / world) / t.per_device_train_batch_size)
    per_epoch = max(batches // t.gradient_accumulation_steps + int(batches % t.gradient_accumulation_steps > 0), 1)
    return math.ceil(t.num_train_epochs * per_epoch)


def weight_bytes(recipe: Recipe, train_bytes: int) -> int:
    """Bytes of one trained weight: the adapter is fp32 (peft upcasts it; bf16 under QLoRA), a full
    fine-tune trains in the training dtype."""
    if recipe.lora.enabled:
        return 2 if recipe.model.load_in_4bit else 4
    return train_bytes


def trained_bytes(recipe: Recipe, sizes, train_bytes: int) -> float:
    """The trained weights as saved: the adapter, or every weight."""
    return sizes.trainable * weight_bytes(recipe, train_bytes)


def checkpoint_bytes(recipe: Recipe, sizes, train_bytes: int) -> float:
    """One checkpoint, at least: the trained weights and the optimizer's states."""
    trained = trained_bytes(recipe, sizes, train_bytes)
    if (stage := deepspeed_stage(recipe)) is not None:
        # DeepSpeed's fp32 master weights and two fp32 moments (global_stepN/), and below ZeRO-3
        # the trained weights (ZeRO-3 may keep them only in its partitioned states)
        return 12.0 * sizes.trainable + (trained if stage < 3 else 0)
    return trained + optimizer_state_bytes(recipe.train.optim, weight_bytes(recipe, train_bytes)) * sizes.trainable


def merged_bytes(recipe: Recipe, sizes) -> float:
    return sizes.params * {"float32": 4}.get(recipe.export.dtype, 2)


def checkpoints_kept(recipe: Recipe, steps: int | None) -> tuple[int, int]:
    """(most at once, left at the end): save_total_limit plus the one written before the oldest
    is rotated out, no more than the saves the steps make (one when the steps are not known)."""
    t = recipe.train
    saves = 1 if steps is None else max(math.ceil(steps / t.save_steps), 1)
    if t.save_total_limit is None:
        return saves, saves
    return min(t.save_total_limit + 1, saves), min(t.save_total_limit, saves)


def estimate(recipe: Recipe, run_dir: RunDir, stages: list[str], sizes, *, train_bytes: int, pairs: int | None, restart: bool = False,
             judge=None, fresh: bool = False) -> list[Writes]:
    """What `stages` (train, evaluate, export) write: into the Hub cache and into the output folder.
    judge: the judge's sizes (checks.judge_sizes), when evaluate runs one. fresh: on a new machine
    (`plan`: a cloud VM), where no Hub download is cached and no checkpoint is written yet."""
    from huggingface_hub import constants

    from .checks import judge_path

    out = Writes(run_dir.root)
    cache = Writes(Path(constants.HF_HUB_CACHE))
    name = recipe.model.name_or_path
    loads_base = "train" in stages or "export" in stages
    # a Hub id, not a builtin or a local folder (modeling.resolve_model_path's cases; no torch import: `plan` calls this)
    hub_model = not name.startswith("builtin:") and not any(p.is_dir() for p in (Path(name).expanduser(), Path(recipe.resolve_path(name))))
    if loads_base and hub_model and (fresh or not _hub_weights_cached(name, recipe.model.revision)):
        cache.need = sizes.params * sizes.stored_bytes
        cache.parts.append(f"the base model's download {size_text(cache.need)}")
    if "evaluate" in stages and judge is not None and not Path(path := judge_path(recipe)).is_dir() and (fresh or not _hub_weights_cached(path, None)):
        cache.need += judge.params * judge.stored_bytes
        cache.parts.append(f"the judge's download {size_text(judge.params * judge.stored_bytes)}")
    trained = trained_bytes(recipe, sizes, train_bytes)
    merged = merged_bytes(recipe, sizes)
    if "train" in stages:
        checkpoint = checkpoint_bytes(recipe, sizes, train_bytes)
        steps = optimizer_steps(recipe, pairs)
        peak, final = checkpoints_kept(recipe, steps)
        there = 0 if restart or fresh else folder_size(run_dir.checkpoints)
        end = final * checkpoint + trained + (merged if "export" in stages else 0)
        out.need = max(peak * checkpoint, end) - there
        kept = f"{final} checkpoint{'s' if final != 1 else ''} of {size_text(checkpoint)}" + (f" ({peak} while the oldest is rotated out)" if peak > final else "")
        out.parts.append(kept + ("" if steps is not None else ", more once prepare has counted the pairs"))
        out.parts.append(f"the trained {'adapter' if recipe.lora.enabled else 'weights'} {size_text(trained)}")
        if there:
            out.parts.append(f"less {size_text(there)} of checkpoints already there")
    if "export" in stages:
        if "train" not in stages:
            out.need = merged
        out.parts.append(f"the merged model {size_text(merged)}")
    out.need = max(out.need, 0.0)
    return [w for w in (cache, out) if w.need > 0]


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


MOUNTINFO = Path("/proc/self/mountinfo")


def mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str]:
    """The mount point holding `path` and its filesystem type ('ext4', 'fuse.rclone', ...), from
    /proc/self/mountinfo; ('', '') where that is not available (macOS)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return "", ""
    where = str(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        # mountinfo escapes space, tab, newline and backslash in octal (\040)
        point = fields[4].encode().decode("unicode_escape")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # a later mount on the same point hides the earlier
            best, kind = point, right.split()[0]
    return best, kind


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding `path`; '' where /proc/self/mountinfo is not available."""
    return mount_of(path, mountinfo)[1]


# A container's own writable layer, as docker (overlay2), podman (overlay; rootless:
# fuse-overlayfs), containerd and old docker (aufs) mount it at /. Docker's rarer storage drivers
# (btrfs, zfs, vfs) mount a filesystem a host also uses at /, and are not told apart: /.dockerenv
# would, but it also stays in VMs made from an image (this development machine has it, with its own
# ext4 disk at /), where refusing would be wrong.
CONTAINER_LAYERS = ("overlay", "fuse.fuse-overlayfs", "aufs")
CONTAINER_ENV = "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS"


def container_layer(folder: Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type when `folder` would be written into a container's own filesystem (the
    root's writable layer, nothing mounted there), else None. What is written there goes with the
    container: `docker run --rm` deletes it, and the next `docker run` starts from the image again,
    so a killed or failed run cannot resume and its finished stages are done again."""
    if os.environ.get(CONTAINER_ENV) == "1":
        return None
    return in_container_layer(folder, mountinfo)


def in_container_layer(folder: Path, mountinfo: str | None = None) -> str | None:
    """container_layer, whatever ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS says (it is about the outputs)."""
    point, kind = mount_of(_existing(folder), mountinfo)
    return kind if point == "/" and kind in CONTAINER_LAYERS else None


def hub_caches() -> list[tuple[str, Path]]:
    """Where the Hub's downloads (models, tokenizers, Hub datasets) and the datasets library's cache
    (every dataset it reads, local files included) are written, as the two libraries decide it."""
    import datasets.config
    import huggingface_hub.constants

    return [("the Hub's downloads go", Path(huggingface_hub.constants.HF_HUB_CACHE)),
            ("the datasets cache goes", Path(datasets.config.HF_DATASETS_CACHE))]


def check_caches_writable() -> None:
    """Refuses (exit 2) a cache folder this user cannot write or make: `docker run --user` with a
    host folder for the Hub cache that Docker made (as root) because it did not exist. prepare
    failed on it, naming the recipe's data file as unreadable."""
    for what, folder in hub_caches():
        anchor = _existing(folder)
        if anchor.is_dir() and os.access(anchor, os.W_OK | os.X_OK):
            continue
        st = anchor.stat()
        found = "a file, not a folder" if not anchor.is_dir() else f"owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:o}"
        verb = "write in" if anchor == folder else "make"
        raise AlignpressError(
            f"{found}: this user (uid {os.getuid()}) cannot {verb} {folder}, where {what}; point HF_HOME at a folder this "
            "user owns, or with `docker run -v HOST:/cache/hf` create HOST first (Docker makes a missing one, as root's)",
            source=str(anchor),
        )


def check_container_outputs(run_dir: RunDir, mountinfo: str | None = None) -> None:
    """Refuses (exit 2) a run or training whose output folder is in the container's own filesystem:
    hours of GPU time whose checkpoints and results would not outlive the container."""
    if kind := container_layer(run_dir.root, mountinfo):
        raise AlignpressError(
            f"the output folder is in this container's own filesystem ({kind} at /, no volume mounted there): a new "
            "`docker run` could not resume a killed or failed run from it, and --rm deletes the results. Mount a host "
            "folder at /outputs (docker run -v $PWD/outputs:/outputs ...; runs go to /outputs/<recipe name>) or at "
            f"--output-dir; {CONTAINER_ENV}=1 writes into the container anyway",
            source=str(run_dir.root),
        )


RCLONE_CACHE = Path("~/.cache/rclone")  # rclone's default cache, and SkyPilot's for MOUNT_CACHED (its --cache-dir)


def landing(folder: Path, mountinfo: str | None = None) -> tuple[Path, str] | None:
    """Where writes into `folder` take disk space, and how to say so; None when no free space
    means anything there. A bucket mounted by rclone with a write cache (SkyPilot's MOUNT_CACHED)
    keeps every file written in its cache until it is uploaded: that disk is the limit. Other FUSE
    mounts (gcsfuse, mountpoint-s3, blobfuse) report a free space that means nothing."""
    anchor = _existing(folder)
    kind = filesystem_type(anchor, mountinfo)
    if kind == "fuse.rclone":
        return _existing(RCLONE_CACHE.expanduser()), f" (written first into rclone's cache in {RCLONE_CACHE})"
    if kind.startswith("fuse"):
        return None
    return anchor, ""


def check(recipe: Recipe, run_dir: RunDir, stages: list[str], *, restart: bool = False) -> str | None:
    """Refuses (exit 2) when `stages` would write more than a filesystem has free; returns a line
    for the log saying what was counted, or None when nothing is to be written. With "prepare" in
    `stages` the pairs are not known yet (one save is counted); `restart`: the checkpoints there
    are set aside, not reused."""
    prepare_first = "prepare" in stages
    stages = [s for s in stages if s in ("train", "evaluate", "export")]
    if not stages:
        return None
    if os.environ.get(SKIP_ENV) == "1":
        return f"disk check skipped ({SKIP_ENV}=1)"
    from .checks import judge_sizes, model_sizes
    from .modeling import pick_device, pick_dtype, weights_dtype

    from huggingface_hub import constants

    sizes = model_sizes(recipe)
    train_bytes = weights_dtype(recipe, pick_dtype(recipe, pick_device(recipe))).itemsize
    pairs = None if prepare_first else prepared_pairs(run_dir)
    judge = judge_sizes(recipe) if "evaluate" in stages else None
    writes = estimate(recipe, run_dir, stages, sizes, train_bytes=train_bytes, pairs=pairs, restart=restart, judge=judge)
    if not writes:
        return None
    stages = [s for s in stages if s != "evaluate" or judge is not None]
    what = " and ".join(stages) if len(stages) < 3 else f"{', '.join(stages[:-1])} and {stages[-1]}"
    groups: dict[int, tuple[Path, list[tuple[Writes, str]]]] = {}
    lines = []
    for w in writes:
        if w.folder == Path(constants.HF_HUB_CACHE) and (kind := in_container_layer(w.folder)):
            # not refused (the run keeps nothing there), but every `docker run` pays for it again
            log.warning("the Hub cache %s is in this container's own filesystem (%s at /): %s there goes with the container, "
                        "and every `docker run` downloads it again; mount a host folder for it (docker run -v "
                        "$HOME/.cache/huggingface:/cache/hf ...)", w.folder, kind, " and ".join(w.parts))
        if (landed := landing(w.folder)) is None:
            lines.append(f"{w.folder}: not checked, on a FUSE mount ({filesystem_type(_existing(w.folder))}) whose free space means nothing")
            continue
        anchor, how = landed
        groups.setdefault(anchor.stat().st_dev, (anchor, []))[1].append((w, how))
    for anchor, ws in groups.values():
        need = sum(w.need for w, _ in ws)
        parts = "; ".join(p for w, _ in ws for p in w.parts)
        where = " and ".join(f"{w.folder}{how}" for w, how in ws)
        free = shutil.disk_usage(anchor).free
        if need > free:
            raise AlignpressError(
                f"not enough disk space: {what} will write at least {size_text(need)} to {where} ({parts}) and its disk has "
                f"{size_text(free)} free; free some space, or write elsewhere (--output-dir; HF_HOME for the model download). "
                f"{SKIP_ENV}=1 skips this check",
                source=str(run_dir.root),
            )
        lines.append(f"{where}: at least {size_text(need)} ({parts}), {size_text(free)} free")
    return f"disk for {what}: " + ("; ".join(lines) if lines else "nothing large to write")
