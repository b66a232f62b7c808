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
from pathlib import Path
from typing import Any

from .errors import AlignpressError
from .modeling import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from .prepare import read_jsonl
from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")

CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_is_complete(path: Path) -> bool:
    if not all((path / name).is_file() and (path / name).stat().st_size > 0 for name in CHECKPOINT_FILES):
        return False
    weights = list(path.glob("adapter_model.safetensors")) + list(path.glob("model*.safetensors"))
    if not weights or any(w.stat().st_size == 0 for w in weights):
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (json.JSONDecodeError, OSError):
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


def _metrics_callback(path: Path, resume_step: int):
    from transformers import TrainerCallback

    # Lines from an interrupted run past the checkpoint we resume from will be logged again.
    if path.exists():
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
        gradient_checkpointing=t.gradient_checkpointing,
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
        report_to="none",
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
    callback = _metrics_callback(run_dir.metrics / "train.jsonl", resume_step)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[callback],
    )
    if resume:
        log.info("resuming training from %s (step %d)", resume, resume_step)
    else:
        log.info("training: %d pairs, %s, %s on %s", len(rows), "LoRA r=%d" % recipe.lora.r if recipe.lora.enabled else "full fine-tuning", dtype, device)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    history = [json.loads(line) for line in (run_dir.metrics / "train.jsonl").read_text().splitlines() if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    if losses and not all(math.isfinite(x) for x in losses):
        raise AlignpressError("training loss became NaN or infinite; lower train.learning_rate or check the data", field="train.learning_rate", source=recipe.source)

    final = run_dir.adapter if recipe.lora.enabled else run_dir.full
    if trainer.is_world_process_zero():
        tmp = run_dir.partial(final)
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        run_dir.commit(tmp, final)
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resume_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "final_loss": losses[-1] if losses else None,
    }
    last = next((h for h in reversed(history) if "rewards/accuracies" in h), {})
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in last:
            summary[key] = last[key]
    log.info("training done: %s", summary)
    return summary
