"""Training health: watch TRL's DPO logs for the known failure signs, while training runs.

HealthCallback (a transformers TrainerCallback) looks at every log event and
- stops training with a clear error (AlignpressError, field train.learning_rate) when the loss,
  gradient norm, rewards or log-probs become NaN or infinite. The Trainer hides a NaN step loss
  from the logged `loss` (logging_nan_inf_filter), so the rewards and log-probs are checked too;
- warns when rewards/accuracies reaches 1.0 within the first EARLY_FRACTION of the steps: the
  pairs are too easy to teach anything (chosen and rejected are told apart at once);
- warns when rewards/chosen has fallen at every one of the last WINDOW logged steps and is
  below zero: the chosen answer is getting less likely, not more (both log-probs collapsing,
  the margin grows only because the rejected one falls faster);
- at the end of training, warns when the model emits no end-of-turn token in greedy answers to
  a few training prompts (EOS_PROMPTS of them, eval.max_new_tokens long): it may never stop.
Warnings go to the log and to run.json's `warnings`; the evaluate stage repeats the eos check
on held-out prompts (eval.json eos_rate).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from .errors import AlignpressError
from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")

EARLY_FRACTION = 0.10  # "the first few percent of steps"
WINDOW = 5  # logged steps of steadily falling rewards/chosen before a warning
EOS_PROMPTS = 8
WATCHED_FINITE = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def eos_warning(where: str, n: int, max_new_tokens: int) -> str:
    return (f"training health: the model generated no end-of-turn token in {n} greedy answers to {where} "
            f"(each capped at {max_new_tokens} new tokens): it may never stop. Check that the chat template ends "
            "an answer with a token the generation config lists in eos_token_id, and that pad differs from eos")


class HealthCallback(TrainerCallback):
    """Register with `callbacks=[..., HealthCallback(recipe, run_dir)]`; see the module docstring."""

    def __init__(self, recipe: Recipe, run_dir: RunDir):
        self.recipe = recipe
        self.run_dir = run_dir
        self.chosen: list[tuple[int, float]] = []
        self.warned: set[str] = set()
        self.warnings: list[str] = []

    def _warn(self, kind: str, message: str, state) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        self.warnings.append(message)
        if getattr(state, "is_world_process_zero", True):
            log.warning("%s", message)
            self.run_dir.warn(message)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        step = state.global_step
        for key in WATCHED_FINITE:
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                control.should_training_stop = True
                raise AlignpressError(
                    f"training stopped at step {step}: {key} is {value} (NaN or infinite). The updates diverged: lower "
                    "train.learning_rate, keep train.max_grad_norm on, and check the data for empty or extremely long answers",
                    source=self.recipe.source, field="train.learning_rate",
                )
        total = state.max_steps or 0
        accuracy = logs.get("rewards/accuracies")
        if isinstance(accuracy, (int, float)) and total > 0 and step <= EARLY_FRACTION * total and accuracy >= 0.999:
            self._warn(
                "easy",
                f"training health: rewards/accuracies reached {accuracy:.3g} at step {step} of {total} (within the first "
                f"{EARLY_FRACTION:.0%} of steps): the pairs look too easy, the chosen and rejected answers are told apart "
                "before the model has learned anything; a reward accuracy of 1.0 says nothing about behaviour, check "
                "metrics/eval.json (held-out preference accuracy and behaviour)",
                state,
            )
        chosen = logs.get("rewards/chosen")
        if isinstance(chosen, (int, float)) and "loss" in logs:  # the final summary log repeats averages: skip it
            self.chosen.append((step, float(chosen)))
            last = [v for _, v in self.chosen[-WINDOW:]]
            if len(last) == WINDOW and all(b < a for a, b in zip(last, last[1:])) and last[-1] < 0:
                logp = logs.get("logps/chosen")
                self._warn(
                    "falling",
                    f"training health: rewards/chosen fell at each of the last {WINDOW} logged steps, to {last[-1]:.4g} at "
                    f"step {step}" + (f" (logps/chosen {logp:.4g})" if isinstance(logp, (int, float)) else "")
                    + ": the chosen answers are getting less likely too, both log-probs are collapsing and the margin grows only "
                    "because the rejected ones fall faster. Lower train.learning_rate, raise dpo.beta, or add an NLL term "
                    "(dpo.loss_type: [sigmoid, sft])",
                    state,
                )

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None or processing_class is None or getattr(args, "world_size", 1) > 1:
            return  # under several processes (DeepSpeed ZeRO-3 shards the weights) evaluate checks eos instead
        if state.max_steps and state.global_step < state.max_steps:
            return  # stopped early (preempted or failed): no time to spend on generation
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return  # ZeRO-3 partitions the weights even in one process
        from .evaluate import generate_ids
        from .prepare import read_jsonl

        rows = read_jsonl(self.run_dir.data / "train.jsonl")[:EOS_PROMPTS]
        if not rows:
            return
        n_tokens = self.recipe.eval.max_new_tokens
        was_training = model.training
        model.eval()
        try:
            gens = generate_ids(model, processing_class, [r["messages"]["prompt"] for r in rows], max_new_tokens=n_tokens, batch_size=len(rows))
        except Exception as e:  # noqa: BLE001 - a health check must never fail a finished training
            log.warning("training health: could not run the eos check (%s: %s)", type(e).__name__, e)
            return
        finally:
            model.train(was_training)
        stopped = sum(g.stopped for g in gens)
        log.info("training health: %d of %d greedy answers to training prompts ended with an end-of-turn token", stopped, len(gens))
        if stopped == 0:
            self._warn("eos", eos_warning("training prompts", len(gens), n_tokens), state)


def check_logged_history(recipe: Recipe, run_dir: RunDir, history: list[dict[str, Any]], max_steps: int) -> list[str]:
    """Replay a logged history (metrics/train.jsonl lines) through the callback; returns its warnings."""
    from types import SimpleNamespace

    cb = HealthCallback(recipe, run_dir)
    for entry in history:
        state = SimpleNamespace(global_step=entry.get("step", 0), max_steps=max_steps, is_world_process_zero=True)
        cb.on_log(None, state, SimpleNamespace(should_training_stop=False), logs=entry)
    return cb.warnings
