"""Stage 2, train: DPO with TRL's DPOTrainer, a LoRA adapter or full fine-tuning.

Reads: data/train.jsonl (the messages), the base model.
Writes: checkpoints/checkpoint-N/ every train.save_steps, metrics/train.jsonl (one line per
logged step), and at the end adapter/ (LoRA, with the tokenizer) or full/ (full fine-tuning).

Resume: a re-run picks the newest complete checkpoint (one with trainer state, weights,
optimizer and scheduler, and every file the Trainer reads back readable to its end) and continues
from it; half-written checkpoints are skipped. If resuming from it still fails before the first
step, the previous complete checkpoint is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

from .checks import check_truncation
from . import processes, tracking
from .errors import AlignpressError, OutOfGpuMemory, Preempted, cuda_oom_numbers
from .health import HealthCallback
from .modeling import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path, weights_dtype
from .prepare import read_jsonl
from .recipe import Recipe, training_fields_changed, warmup_problem
from .runstate import DiskFull, RunDir, disk_full, disk_full_message, duration_text, write_json, written

log = logging.getLogger("alignpress")

CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


# Files torch.save wrote (a zip archive): optimizer, scheduler, scaler.pt, rng_state*.pth (read by
# Trainer._load_rng_state), training_args.bin, and DeepSpeed's shards in global_step*/.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
FULL_CHECK_BYTES = 64 << 20  # smaller zips are CRC-checked in full; bigger ones by their directory


def checkpoint_is_complete(path: Path) -> bool:
    return checkpoint_problem(path) is None


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint unusable, naming the file, or None when it is complete: every required
    file present and readable to the end (JSON parses, safetensors headers and sizes agree, torch's
    zip files have their central directory, written last, and, when small, intact contents)."""
    from safetensors import safe_open

    deepspeed = _deepspeed_states(path)
    if deepspeed is False:
        return "DeepSpeed's states (latest, global_step*/ model and optimizer states) are incomplete"
    # Under DeepSpeed the optimizer and scheduler are in its global_step*/ states, not optimizer.pt
    # and scheduler.pt (every DeepSpeed checkpoint used to be skipped, and training restarted at 0).
    required = ("trainer_state.json",) if deepspeed else CHECKPOINT_FILES
    for name in required:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    weights = list(path.glob("adapter_model.safetensors")) + list(path.glob("model*.safetensors"))
    if not weights and not deepspeed:  # ZeRO-3 may save no usable weights file: its states hold them
        return "no weights file (adapter_model.safetensors or model*.safetensors)"
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        name = f.relative_to(path)
        if f.stat().st_size == 0:
            return f"{name} is empty"
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        st.get_slice(key)  # checks each tensor's byte range lies inside the file
            elif f.suffix in TORCH_SUFFIXES:
                with zipfile.ZipFile(f) as z:
                    if f.stat().st_size <= FULL_CHECK_BYTES and z.testzip() is not None:
                        return f"{name} is damaged"
        except Exception as e:  # noqa: BLE001 - any unreadable part makes the checkpoint unusable
            return f"{name} cannot be read ({type(e).__name__}: cut short?)"
    return None


def _deepspeed_states(path: Path) -> bool | None:
    """None: not a DeepSpeed checkpoint. Else whether the states DeepSpeed resumes from are there:
    `latest` names a global_step folder holding the model and optimizer states."""
    if not any(path.glob("global_step*")):
        return None
    latest = path / "latest"
    if not latest.is_file():
        return False
    states = path / latest.read_text().strip()
    return states.is_dir() and any(states.glob("*model_states.pt")) and any(states.glob("*optim_states.pt"))


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint-N folders in `folder`, newest first; incomplete ones are logged and skipped."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if suffix.isdigit():
            found.append((int(suffix), p))
    complete = []
    for step, p in sorted(found, reverse=True):
        if (problem := checkpoint_problem(p)) is None:
            complete.append(p)
        else:
            log.warning("skipping incomplete checkpoint %s: %s", p, problem)
    return complete


def rotation_callback(limit: int | None, complete: list[Path]):
    """Keeps the newest `limit` complete checkpoints by step (train.save_total_limit; transformers is
    given none). transformers rotates by the folders' times (use_mtime=True), which a folder restored
    from a bucket by a parallel copy, or read through a cloud mount, has in no useful order; and it
    counts a checkpoint a cut-short save left, newer than the complete ones, as one to keep. Here
    `complete` (found complete before training) and the saves of this run are the complete ones; any
    other checkpoint-N older than a save is a leftover of an interrupted save and is removed. A
    checkpoint newer than the save (one that could not be resumed) is left alone."""
    from transformers import TrainerCallback

    known = {int(p.name.removeprefix("checkpoint-")) for p in complete}

    class Rotation(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            now = state.global_step
            known.add(now)
            older = {int(p.name.removeprefix("checkpoint-")): p for p in Path(args.output_dir).glob("checkpoint-*")
                     if p.name.removeprefix("checkpoint-").isdigit() and int(p.name.removeprefix("checkpoint-")) < now}
            kept = [s for s in sorted(older, reverse=True) if s in known][: limit - 1] if limit else list(known)
            for step, path in sorted(older.items()):
                if step in kept:
                    continue
                if step in known:
                    names = [f"checkpoint-{s}" for s in sorted([*kept, now])]
                    names = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
                    log.info("removing checkpoint %s: train.save_total_limit %d keeps %s", path, limit, names)
                    known.discard(step)
                else:
                    log.info("removing checkpoint %s: incomplete (%s), left by a save cut short", path, checkpoint_problem(path) or "not complete when training started")
                shutil.rmtree(path, ignore_errors=True)

    return Rotation()


STAMP = "alignpress.json"  # in each checkpoint: the recipe and data it was trained with


def stamp_callback(recipe: Recipe, run_dir: RunDir):
    """Writes STAMP into every checkpoint the Trainer saves (the main process), so a checkpoint found
    without its folder's records (run.json moved away) can still be told apart from another recipe's."""
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_json(folder / STAMP, {"recipe": recipe.to_dict(), "data_fingerprint": run_dir.load().get("data_fingerprint"),
                                            "processes": args.world_size})

    return Stamp()


def checkpoint_recipe_problem(checkpoint: Path, recipe: Recipe, data_fingerprint: str | None = None) -> str | None:
    """Why `checkpoint` was trained by another recipe or on other data, or None (the same, or no stamp:
    an older alignpress's checkpoint)."""
    try:
        stamp = json.loads((checkpoint / STAMP).read_text())
    except (OSError, ValueError):
        return None
    fields = training_fields_changed(stamp.get("recipe") or {}, recipe.to_dict())
    if fields:
        return f"{', '.join(fields[:4])}{' and more' if len(fields) > 4 else ''} {'differs' if len(fields) == 1 else 'differ'}"
    if data_fingerprint and stamp.get("data_fingerprint") not in (None, data_fingerprint):
        return "the prepared data differs"
    return None


def refuse_other_processes(checkpoint: Path, recipe: Recipe, processes: int | None) -> None:
    """A checkpoint resumed by another number of processes would go on with other batches: the
    Trainer skips the steps done as if each had taken this run's pairs, and the schedule's length
    changes (a DeepSpeed ZeRO checkpoint does not load at all). `processes`: None when not known."""
    try:
        had = json.loads((checkpoint / STAMP).read_text()).get("processes")
    except (OSError, ValueError):
        return
    if not had or not processes or had == processes:
        return
    pairs = recipe.train.per_device_train_batch_size * recipe.train.gradient_accumulation_steps
    raise AlignpressError(
        f"{checkpoint.name} was trained by {had} process{'es' if had != 1 else ''} ({had * pairs} pairs per optimizer step), and this run "
        f"has {processes} ({processes * pairs}): resumed, it would go on with other batches. Resume it with {had} (as many GPUs; "
        "train.num_processes), or `train --restart` to train anew here (the checkpoints move aside)",
        source=str(checkpoint.parent))


def refuse_foreign_checkpoint(checkpoint: Path, recipe: Recipe, data_fingerprint: str | None = None) -> None:
    """Resuming another recipe's (or data's) training would continue it under this recipe's name. The
    folder's records catch that first; this catches it when they were moved away."""
    if problem := checkpoint_recipe_problem(checkpoint, recipe, data_fingerprint):
        raise AlignpressError(
            f"{checkpoint.name} was trained with another recipe or data ({problem}, by its {STAMP}): use another --output-dir "
            "(on SkyPilot: another --env RUN_NAME), or `train --restart` to train anew here (the checkpoints move aside)",
            source=str(checkpoint.parent))


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest complete checkpoint-N in `folder`, skipping incomplete or corrupt ones."""
    found = complete_checkpoints(folder)
    return found[0] if found else None


def out_of_memory(error: BaseException, recipe: Recipe, systems: dict[str, Any], step: int, checkpoint: Path | None) -> OutOfGpuMemory:
    """The line for a CUDA out-of-memory error in training: torch's numbers, how much was recomputed,
    and the way on. Gradient checkpointing may change on a resumed run, so while some layers keep
    their activations the fix keeps the checkpoint; after that, the micro-batch or the pairs' length
    must shrink, which changes what is computed: --restart."""
    numbers = cuda_oom_numbers(str(error))
    layers = systems.get("layers")
    if not systems.get("gradient_checkpointing"):
        recomputed, every = "no layer recomputed (gradient checkpointing off)", False
    elif systems.get("checkpointed_layers") is None or (layers and systems["checkpointed_layers"] >= layers):
        recomputed, every = "every layer recomputed (gradient checkpointing on)", True
    else:
        recomputed, every = f"at most {systems['checkpointed_layers']} of {layers or '?'} layers recomputed (gradient checkpointing)", False
    kept = f"resumes from {checkpoint.name}" if checkpoint is not None else "starts again from step 0 (no checkpoint yet)"
    if not every:
        way = (f"run again with --set train.gradient_checkpointing=true --set train.checkpointed_layers=null (every layer recomputes: "
               f"the least activation memory, about a quarter slower with LoRA); a resumed run may change it, and {kept}")
    else:
        way = ("lower train.per_device_train_batch_size (raising train.gradient_accumulation_steps to keep the pairs per step) or "
               "data.filters.max_tokens, and run with --restart (a checkpoint resumes only with the batches it was trained on)")
    return OutOfGpuMemory(f"CUDA out of memory at step {step} ({numbers + '; ' if numbers else ''}{recomputed}): {way}",
                          source=recipe.source, field="train.gradient_checkpointing" if not every else "train.per_device_train_batch_size")


def precompute_out_of_memory(error: BaseException, recipe: Recipe, batch: int) -> OutOfGpuMemory:
    """The line for a CUDA out-of-memory error in TRL's pass over the reference model, before the
    first step: its batch is its own setting (the log-probs do not depend on it), and nothing was
    trained yet, so starting over loses nothing."""
    smaller = max(1, batch // 2)
    way = (f"run again with --set dpo.precompute_ref_batch_size={smaller} and --restart (nothing was trained yet)" if batch > 1 else
           "lower data.filters.max_tokens (the longest pairs), or set dpo.precompute_ref_log_probs: false (the reference runs with each step), and run with --restart")
    return OutOfGpuMemory(f"CUDA out of memory in the reference log-prob pass before training ({cuda_oom_numbers(str(error)) or 'torch gave no numbers'}; "
                          f"{batch} pair{'s' if batch != 1 else ''} a forward): {way}",
                          source=recipe.source, field="dpo.precompute_ref_batch_size" if batch > 1 else "dpo.precompute_ref_log_probs")


class _ResumeFailed(Exception):
    """Loading a checkpoint failed before the first training step."""

    def __init__(self, checkpoint: Path, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.checkpoint = checkpoint


def _step(line: str) -> int | None:
    """The step of one train.jsonl line; None for a line cut short (a crash or a full disk mid-write)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return None


def _metrics_callback(path: Path, resume_step: int, truncate: bool = True):
    from transformers import TrainerCallback

    # Lines from an interrupted run past the checkpoint we resume from will be logged again; its
    # closing summary (train_runtime, at the step it stopped on) would be one of two in the file.
    if truncate and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if _step(line) is not None and _step(line) <= resume_step and '"train_runtime"' not in line]
        path.write_text("".join(line + "\n" for line in kept))

    class MetricsToJsonl(TrainerCallback):
        """Appends every log event (loss, rewards/*, logps/*, learning_rate, ...) to metrics/train.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            entry.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    return MetricsToJsonl()


# The training metrics in one line (all of them go to metrics/train.jsonl and the tracker)
PROGRESS_KEYS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"), ("grad_norm", "grad norm"), ("learning_rate", "lr"))


def progress_line(step: int, max_steps: int, logs: dict[str, Any], timing: tuple[float, float] | None = None) -> str | None:
    """`step 5/53: loss 1.277, reward accuracy 0.55, ...; 1.2 s so far, about 11.5 s left` for a
    training log event; None for others (the closing train_runtime summary: `training done` says it).
    timing: (seconds since this process started training, seconds a step at the pace measured), from
    which the time left is that pace over the steps still to go."""
    if "loss" not in logs or "train_runtime" in logs:
        return None
    shown = ", ".join(f"{label} {logs[k]:.4g}" for k, label in PROGRESS_KEYS if isinstance(logs.get(k), (int, float)))
    line = f"step {step}/{max_steps}: {shown}"
    if timing is not None:
        elapsed, per_step = timing
        line += f"; {duration_text(elapsed)} so far, about {duration_text(per_step * (max_steps - step))} left"
    return line


def step_pace(now: float, step: int, clock: dict[str, float]) -> tuple[float, float] | None:
    """(seconds since training started, seconds a step) for a log line at `step`: the pace since the
    first log line once there is one, so that what the first steps pay once (CUDA's start, compiled
    layers, a resumed run's data skipping) does not stretch every later estimate; until then, the
    pace since the start. clock: `started` and `step` when training began (a resumed run's
    checkpoint step), and `first_at`, `first_step` once the first line was logged. None before any
    step was taken."""
    if step <= clock["step"]:
        return None
    elapsed = now - clock["started"]
    if "first_at" in clock and step > clock["first_step"]:
        per_step = (now - clock["first_at"]) / (step - clock["first_step"])
    else:
        per_step = elapsed / (step - clock["step"])
        clock.update(first_at=now, first_step=step)
    return elapsed, per_step


def _quiet_progress(trainer) -> None:
    """The Trainer's progress bar stays, but its log events become one short line on stderr (our
    logger's) instead of a dict of every metric on stdout, which stays for results. The line says
    the time left, for a log read where the bar is not drawn (a log file, `docker logs`)."""
    import sys

    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    clock: dict[str, float] = {}

    def begin(state) -> None:
        clock.update(started=time.monotonic(), step=state.global_step)

    def emit(state, logs, bar) -> None:
        timing = step_pace(time.monotonic(), state.global_step, clock) if clock else None
        line = progress_line(state.global_step, state.max_steps, logs or {}, timing)
        if not (state.is_world_process_zero and line and log.isEnabledFor(logging.INFO)):
            return
        if bar is not None:
            bar.write(f"[alignpress] {line}", file=sys.stderr)  # above the bar, which tqdm redraws
        else:
            log.info(line)

    class BarAndLines(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            begin(state)
            return super().on_train_begin(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            emit(state, logs, self.training_bar)

    class Lines(TrainerCallback):  # train.disable_tqdm-like settings: no bar (PrinterCallback's place)
        def on_train_begin(self, args, state, control, **kwargs):
            begin(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            emit(state, logs, None)

    bar = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(BarAndLines() if bar else Lines())


def _no_stray_cards():
    """TRL writes checkpoints/README.md and PEFT checkpoint-N/README.md at every save: the one card is export's."""
    from transformers import TrainerCallback

    class NoStrayCards(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                root = Path(args.output_dir)
                for card in [root / "README.md", *root.glob("checkpoint-*/README.md")]:
                    card.unlink(missing_ok=True)

    return NoStrayCards()


class SpotSafety:
    """Checkpoints every `save_minutes`, and on SIGTERM (the preemption notice), SIGHUP (a closed
    terminal or SSH session) or a first Ctrl-C, then stops. A second Ctrl-C stops at once."""

    SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")

    def __init__(self, save_minutes: float | None):
        from transformers import TrainerCallback

        self.every = save_minutes * 60 if save_minutes else None
        self.last_save = time.monotonic()
        self.sigterm = False  # a stop was asked for: save, then stop
        self.signum = signal.SIGTERM  # the one that asked (another process's: SIGTERM)
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                # 2: stop (SIGTERM), 1: save (timer), 0: go on. Every process takes the largest: a
                # SIGTERM may reach one node only, and the timers differ a little; a process that
                # saved or stopped alone would leave the others waiting in a collective forever.
                want = 2 if outer.sigterm else 1 if outer.every and time.monotonic() - outer.last_save >= outer.every else 0
                want = processes.largest(want, args.device)
                if want == 2:
                    if not outer.sigterm:
                        log.warning("another process received SIGTERM: saving a checkpoint after this step, then stopping")
                    outer.sigterm = True
                    control.should_save = True
                    control.should_training_stop = True
                elif want == 1:
                    control.should_save = True

            def on_save(self, args, state, control, **kwargs):
                outer.last_save = time.monotonic()

        self.callback = _Callback()

    def __enter__(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.sigterm and signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now, without the save
            again = "; Ctrl-C again stops at once, without it" if signum == signal.SIGINT else ""
            log.warning("%s received: saving a checkpoint after this step, then stopping%s", name, again)
            self.sigterm, self.signum = True, signum

        self._previous = {}
        for name in self.SIGNALS:
            try:
                self._previous[name] = signal.signal(getattr(signal, name), handler)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc):
        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        return False


def longest_sequence(rows: list[dict[str, Any]], max_length: int | None) -> int:
    """The longest chosen or rejected row TRL will build from prepared rows (truncated as TRL does)."""
    from .flops import truncate_pair

    longest = 1
    for r in rows:
        seqs = truncate_pair(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"], max_length)
        if seqs:
            longest = max(longest, seqs[0][0], seqs[1][0])
    return longest


def prefix_memory_settings(settings, rows: list[dict[str, Any]], recipe: Recipe):
    """`settings` for prefix-shared DPO: the packed rows that bound any micro-batch of these rows."""
    from dataclasses import replace

    from .flops import packed_layout

    d = recipe.dpo
    pairs = [(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in rows]
    packed_rows, packed_len = packed_layout(pairs, d.max_length, settings.micro_batch_pairs, d.pairs_per_row, d.truncation_mode)
    return replace(settings, packed_rows=packed_rows, packed_len=packed_len)


def run_epochs(recipe: Recipe, pairs: int) -> float:
    """Epochs this run trains for: num_train_epochs, or what max_steps makes of the data."""
    t = recipe.train
    if t.max_steps <= 0:
        return t.num_train_epochs
    world = t.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    return t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * world / max(pairs, 1)


# Why `auto` does not precompute on several nodes.
ACROSS_NODES = ("several nodes: TRL's main process writes the reference log-probs into the output folder and the other "
                "nodes read them at once, but through a bucket mount each node sees the others' writes only after the upload")


def resolve_systems(recipe: Recipe, rows: list[dict[str, Any]], device: str, dtype, run_dir: RunDir | None, config: Any = None, gpu_gib: float | None = None) -> dict[str, Any]:
    """The speed levers as this run uses them: `auto` fields decided, each choice with its reason.

    config: the model's transformers config (for the memory estimate); gpu_gib: free GPU memory
    (None = read it from torch on CUDA). Logged, and recorded in run.json (train.systems).
    """
    import torch

    from .flops import arch_from_config, checkpointing_decision, precompute_decision
    from .modeling import liger_problem

    t, d, m = recipe.train, recipe.dpo, recipe.model
    out: dict[str, Any] = {"device": device, "attn_implementation": m.attn_implementation or "sdpa (default)", "optim": t.optim, "group_by_length": t.group_by_length, "compile_layers": t.compile_layers}
    if device == "cuda":  # processes.configure_cuda_allocator, or the user's own
        out["cuda_allocator"] = processes.cuda_allocator_setting() or "PyTorch's default"

    liger = t.use_liger_kernel
    if liger and (problem := liger_problem(device)):
        liger = False
        out["use_liger_kernel_reason"] = f"off: {problem}"
    out["use_liger_kernel"] = liger

    stored = bool(run_dir is not None and rows and (ref_logps_folder(run_dir, rows) / STORED_MARK).exists())
    if d.precompute_ref_log_probs == "auto" and processes.several_nodes():
        out["precompute_ref_log_probs"] = False
        out["precompute_ref_log_probs_decision"] = {"reason": f"off: {ACROSS_NODES}"}
    elif d.precompute_ref_log_probs == "auto":
        decision = precompute_decision(run_epochs(recipe, len(rows)), stored=stored)
        out["precompute_ref_log_probs"] = decision.pop("precompute_ref_log_probs")
        out["precompute_ref_log_probs_decision"] = decision
    else:
        out["precompute_ref_log_probs"] = d.precompute_ref_log_probs
        if d.precompute_ref_log_probs and processes.several_nodes():
            out["precompute_ref_log_probs_reason"] = f"on as the recipe says, but {ACROSS_NODES}; it works only where every node sees the folder at once (a shared file system)"
    if out["precompute_ref_log_probs"]:
        out["precompute_ref_batch_size"] = d.precompute_ref_batch_size or t.per_device_train_batch_size

    if t.gradient_checkpointing == "auto":
        if device == "cuda" and gpu_gib is None:
            gpu_gib = torch.cuda.mem_get_info()[0] / 1024**3  # free memory, before the model is loaded
        settings = memory_settings(recipe, rows, dtype, out["precompute_ref_log_probs"], liger)
        try:
            arch = arch_from_config(config)
            decision = checkpointing_decision(arch, settings, gpu_gib if device == "cuda" else None)
        except (TypeError, AttributeError) as e:  # a config without the usual decoder shapes
            on = device == "cuda"
            decision = {"gradient_checkpointing": on, "reason": f"{'on' if on else 'off'}: no memory estimate for this model's config ({type(e).__name__})"}
        out["gradient_checkpointing"] = decision.pop("gradient_checkpointing")
        layers = decision.pop("checkpointed_layers", None)
        if out["gradient_checkpointing"] and layers is not None and "layers" in decision:
            out["checkpointed_layers"] = layers  # for the longest micro-batch
            # without a count in the recipe, each micro-batch recomputes only what its own shape needs
            out["checkpointing_per_batch"] = t.checkpointed_layers is None
        elif out["gradient_checkpointing"] and t.checkpointed_layers is not None:  # no estimate: the recipe's count
            out["checkpointed_layers"] = t.checkpointed_layers
        out["gradient_checkpointing_decision"] = decision
    else:
        out["gradient_checkpointing"] = t.gradient_checkpointing
        if t.gradient_checkpointing and t.checkpointed_layers is not None:
            out["checkpointed_layers"] = t.checkpointed_layers
    return out


def memory_settings(recipe: Recipe, rows: list[dict[str, Any]], dtype, precompute: bool, liger: bool):
    """flops.MemorySettings for this recipe and these prepared rows: the micro-batch as it will run,
    its longest sequence (prefix-shared: the packed rows that bound any micro-batch)."""
    import torch

    from .flops import MemorySettings

    t, d, m = recipe.train, recipe.dpo, recipe.model
    settings = MemorySettings(
        weights="nf4" if m.load_in_4bit else ("fp32" if dtype == torch.float32 else "bf16"),
        lora_r=recipe.lora.r if recipe.lora.enabled else None,
        lora_targets=recipe.lora.target_modules,
        optimizer_bits="8bit" if "8bit" in t.optim else "32bit",
        micro_batch_pairs=t.per_device_train_batch_size,
        seq_len=longest_sequence(rows, d.max_length),
        precompute_ref=precompute,
        attn_implementation=m.attn_implementation,
        liger=liger,
        checkpointed_layers=t.checkpointed_layers,
    )
    return prefix_memory_settings(settings, rows, recipe) if d.prefix_sharing else settings


def apply_checkpointing(model, systems: dict[str, Any], recipe: Recipe, rows: list[dict[str, Any]], dtype):
    """Checkpoint only the layers `systems` names (train.checkpointed_layers, or auto's count), and
    with auto, per micro-batch: as few as the estimate for that batch's shape (rows x positions)
    needs within the same share of the GPU as auto's decision. Records the model's layer count.
    Returns the modeling.CheckpointedLayers (None when every layer or none recomputes)."""
    from dataclasses import replace
    from functools import lru_cache

    from .flops import arch_from_config, checkpointing_decision
    from .modeling import limit_checkpointing

    if not systems["gradient_checkpointing"] or systems.get("checkpointed_layers") is None:
        return None
    decide = None
    if systems.get("checkpointing_per_batch"):
        arch = arch_from_config(model.config)
        worst = memory_settings(recipe, rows, dtype, systems["precompute_ref_log_probs"], systems["use_liger_kernel"])
        gpu_gib = systems["gradient_checkpointing_decision"]["gpu_gib"]

        @lru_cache(maxsize=None)
        def decide(rows_n: int, length: int) -> int:
            if recipe.dpo.prefix_sharing:
                batch = replace(worst, packed_rows=rows_n, packed_len=length)
            else:  # TRL's layout: chosen rows, then rejected rows
                batch = replace(worst, micro_batch_pairs=max(rows_n // 2, 1), seq_len=length)
            return checkpointing_decision(arch, batch, gpu_gib)["checkpointed_layers"]
    control = limit_checkpointing(model, systems["checkpointed_layers"], decide)
    systems["layers"] = len(control.layers)
    log.info("gradient checkpointing recomputes %s%d of %d decoder layers", "at most " if decide else "", min(systems["checkpointed_layers"], systems["layers"]), systems["layers"])
    return control


def apply_compile(model, systems: dict[str, Any]):
    """train.compile_layers: compile the decoder layers in place (modeling.compile_layers), before
    the trainer exists so that TRL's precompute pass runs compiled too. Returns a function that
    records how many graphs Dynamo compiled since (run.json: train.systems.compiled_graphs), or None."""
    if not systems.get("compile_layers"):
        return None
    from torch._dynamo.utils import counters

    from .modeling import compile_layers

    before = counters["stats"]["unique_graphs"]
    count = compile_layers(model)
    log.info("torch.compile: %d decoder layers compiled in place; the first steps of each kind (training, reference) include compiling", count)

    def record() -> None:
        import torch._dynamo

        systems["compiled_graphs"] = counters["stats"]["unique_graphs"] - before
        log.info("torch.compile: %d graphs compiled during training", systems["compiled_graphs"])
        limit = torch._dynamo.config.recompile_limit
        if systems["compiled_graphs"] >= limit:
            # the layers share one code object, so one limit: calls of a kind beyond it ran eager
            log.warning("torch.compile: %d graphs reach Dynamo's recompile limit (%d); calls of any further kind ran eager", systems["compiled_graphs"], limit)

    return record


def log_systems(systems: dict[str, Any]) -> None:
    for key in ("gradient_checkpointing", "precompute_ref_log_probs", "use_liger_kernel"):
        why = systems.get(f"{key}_decision", {}).get("reason") or systems.get(f"{key}_reason")
        (log.warning if key in ("use_liger_kernel", "precompute_ref_log_probs") and systems.get(f"{key}_reason") else log.info)("%s: %s%s", key, systems[key], f" ({why})" if why else "")


def dpo_config(recipe: Recipe, run_dir: RunDir, device: str, dtype, systems: dict[str, Any] | None = None, trackers: dict[str, Any] | None = None) -> Any:
    """TRL's DPOConfig for the recipe; `systems` (resolve_systems) gives the levers' run-time values,
    `trackers` the tracking fields (tracking.setup, called by training only: it sets up the tracked
    run and records it in run.json, which a validity check must not do). None = no tracker."""
    import torch
    from trl import DPOConfig

    t, d = recipe.train, recipe.dpo
    if systems is None:
        systems = resolve_systems(recipe, [], device, dtype, None)
    return DPOConfig(
        output_dir=str(run_dir.checkpoints),
        # DPO (TRL names)
        beta=d.beta,
        loss_type=[d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type),
        loss_weights=d.loss_weights,
        label_smoothing=d.label_smoothing,
        max_length=d.max_length,
        truncation_mode=d.truncation_mode,
        disable_dropout=d.disable_dropout,  # also the adapter's lora_dropout (TRL disables it after wrapping the model)
        precompute_ref_log_probs=systems["precompute_ref_log_probs"],
        precompute_ref_batch_size=systems.get("precompute_ref_batch_size"),
        # optimisation
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        activation_checkpointing=systems["gradient_checkpointing"],  # transformers 5.23's name; the old one warns
        optim=t.optim,
        use_liger_kernel=systems["use_liger_kernel"],
        # Length grouping reads the `length` column (training_dataset); TRL's default column
        # pruning would drop it, so unused columns are kept (its collator ignores them).
        train_sampling_strategy="group_by_length" if systems["group_by_length"] else "random",
        remove_unused_columns=not systems["group_by_length"],
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16 and device == "cuda",
        fp16=False,
        use_cpu=device == "cpu",
        # bookkeeping
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation_callback keeps train.save_total_limit of them, by step
        eval_strategy="no",
        **(trackers or {"report_to": "none"}),  # report_to, run_name, project (alignpress.tracking)
        # Tokens are never given to the trainer: it would pickle them into training_args.bin.
        push_to_hub=False,
        hub_token=None,
        dataloader_num_workers=0,
    )


STORED_MARK = ".complete"


def lora_config(recipe: Recipe, **override: Any):
    """PEFT's LoraConfig from the recipe (also used by checks.py on the meta-device model)."""
    from peft import LoraConfig

    kwargs = dict(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return LoraConfig(**{**kwargs, **override})


def to_dataset(rows: list[dict[str, Any]], with_length: bool = False):
    """TRL's conversational columns; `length` (prompt + longer answer, in tokens) for length grouping."""
    from datasets import Dataset

    out = []
    for r in rows:
        row = {k: r["messages"][k] for k in ("prompt", "chosen", "rejected")}
        if with_length:
            row["length"] = pair_length(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"])
        out.append(row)
    return Dataset.from_list(out)


def pair_length(prompt: int, chosen: int, rejected: int) -> int:
    """The padded length a pair's rows need: prompt + the longer answer (tokens)."""
    return prompt + max(chosen, rejected)


def precompute_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows longest first, so that TRL's precompute pass (its DataLoader keeps the dataset's order)
    batches neighbours by length and pads little. Training stays as random: the sampler (random
    or length-grouped) permutes the rows with the seed either way (another permutation than
    without precompute, not a sorted one). Stable, so a resumed run builds the same dataset (same
    fingerprint, stored log-probs found)."""
    return sorted(rows, key=lambda r: -pair_length(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]))


def ref_logps_folder(run_dir: RunDir, rows: list[dict[str, Any]]) -> Path:
    """Where this data's precomputed reference log-probs live: keyed by the training rows' content."""
    digest = hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()[:16]
    return run_dir.root / "ref_logps" / digest


def training_dataset(rows: list[dict[str, Any]], run_dir: RunDir, systems: dict[str, Any]):
    """The training Dataset; with precomputed reference log-probs, one stored in the output folder.

    TRL 1.16 caches its tokenisation and the precomputed log-probs (columns ref_chosen_logps and
    ref_rejected_logps, keyed by the dataset's fingerprint and a hash of the reference weights) as
    Arrow files next to the dataset's own files. An in-memory dataset has none, so they would go
    to a temporary folder and a resumed run would compute them again; a dataset saved under
    ref_logps/<data digest>/ keeps them with the run.
    """
    if not systems["precompute_ref_log_probs"]:
        return to_dataset(rows, with_length=systems["group_by_length"])
    dataset = to_dataset(precompute_order(rows), with_length=systems["group_by_length"])
    from datasets import load_from_disk

    folder = ref_logps_folder(run_dir, rows)
    with processes.main_process_first():
        if not (folder / "dataset_info.json").exists() and run_dir.writer:
            if folder.parent.is_dir():
                for old in folder.parent.iterdir():  # another data version's: training redoes them
                    shutil.rmtree(old, ignore_errors=True)
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.save_to_disk(str(tmp))
            os.replace(tmp, folder)
    return load_from_disk(str(folder))


def _inputs(run_dir: RunDir) -> tuple[list[dict[str, Any]], list[Path]]:
    """The prepared pairs and the complete checkpoints, newest first (read by the main process)."""
    rows = read_jsonl(run_dir.data / "train.jsonl")
    if not rows:
        raise AlignpressError("data/train.jsonl is empty; re-run prepare", source=str(run_dir.data / "train.jsonl"))
    return rows, complete_checkpoints(run_dir.checkpoints)


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    # Every process trains on the main process's pairs and resumes its checkpoint (processes.py).
    rows, candidates = processes.from_main(lambda: _inputs(run_dir))
    complete = list(candidates)
    fingerprint = run_dir.load().get("data_fingerprint")
    if candidates:
        refuse_foreign_checkpoint(candidates[0], recipe, fingerprint)
    truncated = check_truncation(recipe, rows)  # before the model loads: dpo.max_length may have changed since prepare
    check_schedule(recipe, len(rows))
    failures = []
    while True:
        resume = candidates.pop(0) if candidates else None
        if resume is not None:  # a fallback too: an older checkpoint may be another recipe's
            refuse_foreign_checkpoint(resume, recipe, fingerprint)
        try:
            return {**_train(recipe, run_dir, rows, resume, complete), "truncated_pairs": truncated}
        except _ResumeFailed as e:
            failures.append(f"{e.checkpoint.name}: {e}")
            _free_memory()
            if not candidates:
                raise AlignpressError(
                    f"no checkpoint could be resumed ({'; '.join(failures)[:1500]}); `train --restart` trains from the start "
                    "(the checkpoints are kept aside until it finishes)",
                    source=str(run_dir.checkpoints),
                ) from None
            log.warning("resuming from %s failed (%s); falling back to %s", e.checkpoint, e, candidates[0])
        finally:
            _forget_deepspeed()


def _forget_deepspeed() -> None:
    """After training: the Trainer leaves transformers' DeepSpeed config set (a weak reference that
    lives until the garbage collector breaks the Trainer's reference cycles), and a later
    from_pretrained (evaluate, export) then built the model under ZeRO-3's zero.Init: a collective,
    among processes that have left (cli._execute_stages). It failed the whole ZeRO-3 run."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def optimizer_steps(recipe: Recipe, pairs: int) -> tuple[int, int]:
    """(pairs per optimizer step, optimizer steps of the run) for `pairs` training pairs, counted as
    transformers' Trainer counts them (micro-batches per epoch // accumulation, at least 1)."""
    t = recipe.train
    world = t.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if t.max_steps > 0:
        return per_step, t.max_steps
    batches = math.ceil(pairs / (t.per_device_train_batch_size * world))
    return per_step, math.ceil(t.num_train_epochs * max(batches // t.gradient_accumulation_steps, 1))


def check_schedule(recipe: Recipe, pairs: int) -> None:
    """Before the model loads: a schedule that cannot train. Warmup that never ends leaves the
    learning rate near 0 for the whole run (the aligned model barely moved, and the run used to
    finish and export it); an optimizer step larger than the data is one partial step."""
    per_step, steps = optimizer_steps(recipe, pairs)
    t = recipe.train
    if per_step > pairs:
        raise AlignpressError(f"each optimizer step takes {per_step:,} pairs (per_device_train_batch_size x gradient_accumulation_steps x processes), "
                              f"more than the {pairs:,} training pairs prepared: lower train.gradient_accumulation_steps",
                              source=recipe.source, field="train.gradient_accumulation_steps")
    if problem := warmup_problem(t.warmup_steps, steps):
        raise AlignpressError(f"{problem} ({pairs:,} training pairs, {per_step:,} a step)", source=recipe.source, field="train.warmup_steps")


def _drop_incomplete(run_dir: RunDir) -> DiskFull:
    """After a full disk: remove the checkpoint that could not be written (never a complete one),
    so the failure can be recorded and the next save has room; returns the error to raise."""
    dropped = []
    for p in run_dir.checkpoints.glob("checkpoint-*"):
        if p.is_dir() and not checkpoint_is_complete(p):
            dropped.append(written(p))
            log.warning("removing %s: the disk filled while it was written", p)
            shutil.rmtree(p, ignore_errors=True)
    return disk_full_message(run_dir.root, dropped) if dropped else run_dir.disk_full_error()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train(recipe: Recipe, run_dir: RunDir, rows: list[dict[str, Any]], resume: Path | None, complete: list[Path]) -> dict[str, Any]:
    from transformers import TrainerCallback

    device = pick_device(recipe)
    dtype = pick_dtype(recipe, device)
    base_path = resolve_model_path(recipe)
    tok = load_tokenizer(recipe, base_path)
    import torch

    # train.use_liger_kernel without the package on CUDA is refused by modeling.preflight, before prepare.
    gpu_gib = torch.cuda.mem_get_info()[0] / 1024**3 if device == "cuda" else None  # before the weights land
    # Full fine-tuning: float32 weights, `dtype` the autocast compute (modeling.full_weights_in_fp32).
    held = weights_dtype(recipe, dtype)
    if held != dtype:
        log.info("full fine-tuning: weights held in float32, computed in %s under autocast (bf16 weights would lose the small updates)",
                 str(dtype).removeprefix("torch."))
    model = load_model(recipe, base_path, device=device, dtype=held, quantized=recipe.model.load_in_4bit, tokenizer=tok, training=True)
    # One decision for every process: different ones (free memory differs a little per GPU, a stored
    # pass not yet visible on another node) would run different collectives and hang.
    systems = processes.from_main(lambda: resolve_systems(recipe, rows, device, held, run_dir, config=model.config, gpu_gib=gpu_gib))
    log_systems(systems)
    checkpointed = apply_checkpointing(model, systems, recipe, rows, held)
    compiled = apply_compile(model, systems)

    peft_config = None
    if recipe.lora.enabled:
        peft_config = lora_config(recipe)
        if recipe.model.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=systems["gradient_checkpointing"])

    args = dpo_config(recipe, run_dir, device, dtype, systems, tracking.setup(recipe, run_dir))
    dataset = training_dataset(rows, run_dir, systems)
    setup_started = time.monotonic()
    resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    run_dir.metrics.mkdir(parents=True, exist_ok=True)
    callback = _metrics_callback(run_dir.metrics / "train.jsonl", resume_step, truncate=run_dir.writer)

    spot = SpotSafety(recipe.train.save_minutes)
    started = []

    class FirstStep(TrainerCallback):
        """Marks the end of checkpoint loading: the Trainer reads every file before the first step."""

        def on_step_begin(self, args, state, control, **kwargs):
            started.append(True)

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed Trainer takes the checkpoint's save and logging cadence (its trainer_state.json
            # replaces the one computed from these args): the recipe's, which may change on resume, wins.
            state.compute_steps(args, state.max_steps)

    from .refcache import StableKeyDPOTrainer, fast_weights_hash

    trainer_class, extra = StableKeyDPOTrainer, {}
    if recipe.dpo.prefix_sharing:
        from .prefix_dpo import PrefixSharedDPOTrainer

        trainer_class, extra = PrefixSharedDPOTrainer, {"pairs_per_row": recipe.dpo.pairs_per_row}

    with fast_weights_hash() as hashing:  # TRL's cache key for precomputed log-probs, 14x faster (refcache.py)
        try:
            trainer = trainer_class(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tok,
                peft_config=peft_config,
                callbacks=[callback, spot.callback, HealthCallback(recipe, run_dir), FirstStep(), _no_stray_cards(), tracking.link_callback(recipe, run_dir),
                           stamp_callback(recipe, run_dir), rotation_callback(recipe.train.save_total_limit, complete)],
                **extra,
            )
        except torch.OutOfMemoryError as e:  # TRL runs the precompute pass while the trainer is built
            if not systems["precompute_ref_log_probs"]:
                raise
            raise precompute_out_of_memory(e, recipe, systems["precompute_ref_batch_size"]) from e
    _quiet_progress(trainer)
    if systems["precompute_ref_log_probs"]:
        folder = Path(dataset.cache_files[0]["filename"]).parent
        reused = trainer.ref_batches_computed == 0
        systems["precompute"] = {"folder": str(folder), "reused": reused, "setup_s": round(time.monotonic() - setup_started, 2), "hash_s": hashing.get("hash_s")}
        if run_dir.writer:
            (folder / STORED_MARK).write_text("reference log-probs cached here by TRL (cache-*.arrow)\n")
        log.info("reference log-probs %s %s (trainer setup %.1f s, of which %.1f s hashing the weights for the key)", "reused from" if reused else "computed and stored in", folder, systems["precompute"]["setup_s"], hashing.get("hash_s") or 0.0)
    if resume:
        log.info("resuming training from %s (step %d)", resume, resume_step)
    else:
        log.info("training: %d pairs, %s, %s on %s%s", len(rows), "LoRA r=%d" % recipe.lora.r if recipe.lora.enabled else "full fine-tuning", dtype, device,
                 f", prefix-shared ({recipe.dpo.pairs_per_row} pairs a row)" if recipe.dpo.prefix_sharing else "")
    # The batch grows with the processes (a multi-node launch: 16 GPUs make the recipe's 4 pairs 64)
    # while the learning rate stays the recipe's: said, so the change is seen.
    a = trainer.args
    log.info("each optimizer step: %d pairs (%d process%s x %d pairs x %d accumulation steps)%s", a.world_size * a.per_device_train_batch_size * a.gradient_accumulation_steps,
             a.world_size, "es" if a.world_size > 1 else "", a.per_device_train_batch_size, a.gradient_accumulation_steps,
             f"; train.learning_rate {a.learning_rate:g} as the recipe sets it, for {a.world_size}x the pairs of one process" if a.world_size > 1 else "")
    with spot:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Exception as e:
            for cb in trainer.callback_handler.callbacks:  # so the error line is the last one printed
                if getattr(cb, "training_bar", None) is not None:
                    cb.training_bar.close()
                    cb.training_bar = None
            if disk_full(e, run_dir.root) and run_dir.writer:
                raise _drop_incomplete(run_dir) from e
            if isinstance(e, torch.OutOfMemoryError):
                raise out_of_memory(e, recipe, systems, trainer.state.global_step, latest_checkpoint(run_dir.checkpoints)) from e
            if resume is not None and not started and not isinstance(e, AlignpressError):
                log.debug("resume from %s failed", resume, exc_info=True)
                raise _ResumeFailed(resume, e) from e
            raise
    if spot.sigterm:
        stop = Preempted(f"stopped by {signal.Signals(spot.signum).name} at step {trainer.state.global_step}; a checkpoint was saved in "
                         f"{run_dir.checkpoints}. Run `run` or `train` again, without --restart, to resume from it")
        stop.exit_code = 128 + spot.signum  # 143 SIGTERM, 130 Ctrl-C, 129 SIGHUP: as if the signal had ended it
        raise stop

    history = processes.from_main(lambda: [json.loads(line) for line in (run_dir.metrics / "train.jsonl").read_text().splitlines() if line.strip()])
    losses = [h["loss"] for h in history if "loss" in h]
    if losses and not all(math.isfinite(x) for x in losses):
        raise AlignpressError("training loss became NaN or infinite; lower train.learning_rate or check the data", field="train.learning_rate", source=recipe.source)

    final = run_dir.adapter if recipe.lora.enabled else run_dir.full
    if trainer.is_world_process_zero():
        tmp = run_dir.partial(final)
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty template; export writes the adapter's card
        tok.save_pretrained(str(tmp))
        run_dir.commit(tmp, final)
    if compiled is not None:
        compiled()
    if checkpointed is not None and checkpointed.decide is not None:
        # training forwards by the number of layers they recomputed (this process's)
        systems["checkpointed_layers_per_batch"] = {str(k): n for k, n in sorted(checkpointed.seen.items())}
        log.info("gradient checkpointing per micro-batch: %s", ", ".join(f"{n} with {k} of {systems['layers']} layers" for k, n in sorted(checkpointed.seen.items())))
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resume_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "final_loss": losses[-1] if losses else None,
        "systems": systems,
    }
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    summary["world_size"] = trainer.args.world_size
    summary["hardware"] = hardware_text(systems["device"], trainer.args.world_size)
    summary["deepspeed_zero_stage"] = plugin.zero_stage if plugin is not None else None
    # The loss and the rewards of one logging window: the last one that logged a loss. The end of
    # training logs the steps after it (three, say) without a loss, and their rewards are noisier.
    logged = [h for h in history if "loss" in h]
    last = logged[-1] if logged else {}
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in last:
            summary[key] = last[key]
    if last.get("step") is not None:  # a resumed run logs again the steps after its checkpoint: the latest earlier step
        before = [h["step"] for h in logged if h.get("step") is not None and h["step"] < last["step"]]
        summary["final_window_steps"] = [max(before, default=0) + 1, last["step"]]
    log.info("%s", done_line(summary))
    return summary


def hardware_text(device: str, processes: int) -> str:
    """What trained: `1 x NVIDIA L40S`, `16 x NVIDIA H100 80GB HBM3 on 2 nodes`, `CPU (2 cores)`,
    `CPU (2 processes)`, for run.json and the card."""
    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    nodes = f" on {processes // per_node} nodes" if processes > per_node > 0 else ""
    if device == "cuda":
        return f"{processes} x {torch.cuda.get_device_name()}{nodes}"
    return f"CPU ({processes} processes{nodes})" if processes > 1 else f"CPU ({os.cpu_count()} cores)"


def done_line(summary: dict[str, Any]) -> str:
    """`training done: 53 steps in 4.3 s; steps 46-50: loss 1.138, ...` (the whole summary, with the
    systems decisions logged as training started, is run.json's stages.train)."""
    resumed = f" (resumed from step {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""
    line = f"training done: {summary['global_step']} steps in {duration_text(summary['train_runtime_s'])}{resumed}"
    shown = [f"{label} {summary[key]:.4g}" for key, label in (("final_loss", "loss"), *PROGRESS_KEYS[1:3]) if isinstance(summary.get(key), (int, float))]
    if shown:
        window = summary.get("final_window_steps")
        line += f"; {'steps {}-{}'.format(*window) if window else 'last logged'}: {', '.join(shown)}"
    return line + " (run.json: stages.train)"
