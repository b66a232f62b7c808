"""Stage 2, train: DPO with TRL's DPOTrainer, a LoRA adapter or full fine-tuning.

Reads: data/train.jsonl (the messages), the base model.
Writes: checkpoints/checkpoint-N/ every train.save_steps, metrics/train.jsonl (one line per
logged step), and at the end adapter/ (LoRA, with the tokenizer) or full/ (full fine-tuning).

Resume: a re-run picks the newest complete checkpoint (one with trainer state, weights,
optimizer and scheduler) and continues from it; half-written checkpoints are skipped.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

from . import tracking
from .errors import AlignpressError, Preempted
from .health import HealthCallback
from .modeling import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from .prepare import read_jsonl
from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")

CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_is_complete(path: Path) -> bool:
    """All files present and readable to the end: trainer state parses, safetensors headers and
    sizes agree, torch's zip files have their central directory (written last)."""
    from safetensors import safe_open

    if not all((path / name).is_file() and (path / name).stat().st_size > 0 for name in CHECKPOINT_FILES):
        return False
    weights = list(path.glob("adapter_model.safetensors")) + list(path.glob("model*.safetensors"))
    if not weights:
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # checks each tensor's byte range lies inside the file
        for name in ("optimizer.pt", "scheduler.pt"):
            with zipfile.ZipFile(path / name) as z:
                z.namelist()
    except Exception:  # noqa: BLE001 - any unreadable part makes the checkpoint unusable
        return False
    return True


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest complete checkpoint-N in `folder`, skipping incomplete or corrupt ones."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.removeprefix("checkpoint-")
        if suffix.isdigit():
            found.append((int(suffix), p))
    for step, p in sorted(found, reverse=True):
        if checkpoint_is_complete(p):
            return p
        log.warning("skipping incomplete checkpoint %s", p)
    return None


def _metrics_callback(path: Path, resume_step: int, truncate: bool = True):
    from transformers import TrainerCallback

    # Lines from an interrupted run past the checkpoint we resume from will be logged again.
    if truncate and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
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
    """Checkpoints every `save_minutes` and on SIGTERM (the preemption notice), then stops."""

    def __init__(self, save_minutes: float | None):
        from transformers import TrainerCallback

        self.every = save_minutes * 60 if save_minutes else None
        self.last_save = time.monotonic()
        self.sigterm = False
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.sigterm:
                    control.should_save = True
                    control.should_training_stop = True
                elif outer.every and time.monotonic() - outer.last_save >= outer.every:
                    control.should_save = True

            def on_save(self, args, state, control, **kwargs):
                outer.last_save = time.monotonic()

        self.callback = _Callback()

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
            self.sigterm = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def dpo_config(recipe: Recipe, run_dir: RunDir, device: str, dtype) -> Any:
    import torch
    from trl import DPOConfig

    t, d = recipe.train, recipe.dpo
    return DPOConfig(
        output_dir=str(run_dir.checkpoints),
        # DPO (TRL names)
        beta=d.beta,
        loss_type=[d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type),
        loss_weights=d.loss_weights,
        label_smoothing=d.label_smoothing,
        max_length=d.max_length,
        truncation_mode=d.truncation_mode,
        precompute_ref_log_probs=d.precompute_ref_log_probs,
        # optimisation
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5.23's name; the old one warns
        optim=t.optim,
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
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        **tracking.setup(recipe, run_dir),  # report_to, run_name, project (alignpress.tracking)
        # Tokens are never given to the trainer: it would pickle them into training_args.bin.
        push_to_hub=False,
        hub_token=None,
        dataloader_num_workers=0,
    )


def to_dataset(rows: list[dict[str, Any]]):
    from datasets import Dataset

    return Dataset.from_list([{k: r["messages"][k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    from trl import DPOTrainer

    device = pick_device(recipe)
    dtype = pick_dtype(recipe, device)
    base_path = resolve_model_path(recipe)
    tok = load_tokenizer(recipe, base_path)
    rows = read_jsonl(run_dir.data / "train.jsonl")
    if not rows:
        raise AlignpressError("data/train.jsonl is empty; re-run prepare", source=str(run_dir.data / "train.jsonl"))
    model = load_model(recipe, base_path, device=device, dtype=dtype, quantized=recipe.model.load_in_4bit, tokenizer=tok)

    peft_config = None
    if recipe.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=recipe.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        if recipe.model.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)

    args = dpo_config(recipe, run_dir, device, dtype)
    resume = latest_checkpoint(run_dir.checkpoints)
    resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    run_dir.metrics.mkdir(parents=True, exist_ok=True)
    callback = _metrics_callback(run_dir.metrics / "train.jsonl", resume_step, truncate=run_dir.writer)

    spot = SpotSafety(recipe.train.save_minutes)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[callback, spot.callback, HealthCallback(recipe, run_dir), _no_stray_cards()],
    )
    if resume:
        log.info("resuming training from %s (step %d)", resume, resume_step)
    else:
        log.info("training: %d pairs, %s, %s on %s", len(rows), "LoRA r=%d" % recipe.lora.r if recipe.lora.enabled else "full fine-tuning", dtype, device)
    with spot:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if spot.sigterm:
        raise Preempted(f"stopped by SIGTERM at step {trainer.state.global_step}; a checkpoint was saved in {run_dir.checkpoints}. Run the same command again to resume")

    history = [json.loads(line) for line in (run_dir.metrics / "train.jsonl").read_text().splitlines() if line.strip()]
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
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resume_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "final_loss": losses[-1] if losses else None,
    }
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    summary["world_size"] = trainer.args.world_size
    summary["deepspeed_zero_stage"] = plugin.zero_stage if plugin is not None else None
    last = next((h for h in reversed(history) if "rewards/accuracies" in h), {})
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in last:
            summary[key] = last[key]
    log.info("training done: %s", summary)
    return summary
