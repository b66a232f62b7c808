"""Stage 3, evaluate: the base (reference) model against the aligned model on held-out pairs.

Reads: data/eval.jsonl, the base model, adapter/ (or full/), metrics/train.jsonl (for the plots),
and eval.judge (a reward model) when the recipe names one.
Writes: metrics/eval.json, metrics/report.md (the numbers and the side-by-side generations), and
plots/ (train_curves.png, eval_before_after.png; see alignpress.plots).

metrics/eval.json, schema version 2 (every number is a mean over the held-out pairs or prompts;
"up" / "down" say which way it moves when alignment works):

- n_pairs: held-out pairs scored (eval.max_rows at most); n_generations: held-out prompts
  generated greedily (eval.generation_rows); beta: dpo.beta; behaviour_measure: in words.
- base, aligned: one block per model, the same fields:
  - preference_accuracy (up): share of pairs whose chosen answer has a higher summed log-probability
    log pi(y|x) than the rejected one;
  - behaviour (up): share of greedy generations showing the chosen behaviour: matching
    eval.behaviour_pattern when set, else closer (word-overlap F1) to the chosen answer than to the
    rejected one;
  - mean_logp_chosen, mean_logp_rejected: summed log-probability of the chosen / rejected answer
    (nats; chosen should not fall: when both fall the model is unlearning the data);
    mean_logp_margin (up): chosen minus rejected;
  - mean_generation_words, mean_generation_tokens: length of the greedy answers (end token not
    counted); DPO tends to lengthen answers, so watch for a jump;
  - eos_rate (stay near 1): share of greedy answers that ended with an end-of-turn token within
    eval.max_new_tokens; 0 means the model never stops.
- aligned only:
  - reward_accuracy (up): share of pairs where DPO's implicit reward
    r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) ranks chosen above rejected;
    mean_reward_margin (up): mean r(chosen) - r(rejected); mean_reward_chosen, mean_reward_rejected:
    the two rewards (rejected should fall; chosen ideally rises or stays near 0);
  - kl_estimate (small; 0 = unchanged): estimated KL(pi || pi_ref) in nats per answer: for each
    held-out generation prompt x and the aligned model's greedy answer y, the sum over answer
    positions t of the exact next-token KL, sum_v pi(v|x,y<t) * (log pi(v|x,y<t) - log pi_ref(v|x,y<t)),
    averaged over prompts. Always >= 0. An estimate: the chain rule gives the true sequence KL when y
    is sampled from pi; here y is the greedy answer. kl_per_token: the same per answer token;
  - logratio_estimate, logratio_per_token: the plain Monte-Carlo form on the same answers,
    log pi(y|x) - log pi_ref(y|x) (positive = the aligned model finds its own answer more likely than
    the base does); noisier, can be negative.
- kl_method: the KL estimator in words.
- samples: the first n_generations held-out prompts: prompt, base, aligned (greedy answers),
  chosen (the data's chosen answer), and judge_base / judge_aligned scores with a judge.
- prompt_samples: the same for eval.prompts (prompt, base, aligned[, judge_*]).
- judge: null, or {model, n, wins, ties, losses, win_rate, ci95, mean_score_base,
  mean_score_aligned, method}: the reward model scores both greedy answers for every prompt in
  samples and prompt_samples; win_rate (up; 0.5 = no difference) = (wins + ties / 2) / n, with a
  95% Wilson score interval.
- gate: null, or the publish gate's verdict (alignpress.gate): min_gain, max_kl,
  preference_accuracy_gain, kl_estimate, passed, reasons.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .checks import judge_path
from .errors import AlignpressError, OutOfGpuMemory, cuda_oom_numbers
from .formats import common_prefix
from .modeling import load_model, load_tokenizer, pick_device, resolve_model_path, stop_token_ids
from .prepare import read_jsonl
from .recipe import Recipe
from .runstate import RunDir, duration_text, write_json

log = logging.getLogger("alignpress")

SCHEMA_VERSION = 2
KL_METHOD = (
    "sum over the aligned model's greedy answer of the exact next-token KL(pi || pi_ref), nats per answer, "
    "mean over held-out prompts (an estimate: exact when answers are sampled from pi)"
)


def _ids(tok, messages, gen=False) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]


# Quarter lines only once a pass has run this long: the demo's passes take a tenth of a second, and
# their quarter lines were 20 of the evaluate stage's lines.
PROGRESS_AFTER_S = 10.0


def progress(label: str | None, done: int, step: int, total: int, unit: str, started: float | None = None) -> None:
    """A log line when `done` passes a quarter of `total` (scoring and generating take minutes on a real
    model), with the time so far and left at that pace (`started`: time.monotonic() at the start), or
    the whole time on the last line. A pass that is quick (under PROGRESS_AFTER_S so far) gets only
    the last line."""
    if not label or not total:
        return
    every = max(1, math.ceil(total / 4))
    if done >= total or done // every > (done - step) // every:
        timing = ""
        if started is not None:
            elapsed = time.monotonic() - started
            if done < total and elapsed < PROGRESS_AFTER_S:
                return
            timing = f" in {duration_text(elapsed)}" if done >= total else \
                f"; {duration_text(elapsed)} so far, about {duration_text(elapsed / done * (total - done))} left"
        log.info("%s: %d/%d %s%s", label, min(done, total), total, unit, timing)


def longest_first(lengths: list[int]) -> list[int]:
    """Indices of `lengths`, longest first (ties in their order)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _keeps_positions(model) -> bool:
    """Whether the model's forward takes transformers' `logits_to_keep` as a boolean (rows, positions)
    mask (slice_logits_to_keep: transformers' own model classes); remote code may slice an int only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.") and "logits_to_keep" in inspect.signature(type(base).forward).parameters


def span_logits(model, ids: torch.Tensor, attn: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Row j's logits at positions spans[j] = (first, end), end exclusive (the positions that predict
    its answer tokens). Only those positions go through the LM head where the model takes a boolean
    logits_to_keep: the whole batch's logits were rows x tokens x vocabulary (Gemma: 256k a token),
    most of them at prompt positions that nothing reads. No forward when no row has a span."""
    sizes = [max(end - first, 0) for first, end in spans]
    device = next(model.parameters()).device
    if not any(sizes):
        return [torch.empty(0, 0, device=device) for _ in spans]
    if _keeps_positions(model):
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for j, (first, end) in enumerate(spans):
            mask[j, first:end] = True
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=mask.to(device)).logits
        if logits.ndim == 2 and logits.shape[0] == sum(sizes):  # the kept positions, row after row
            return list(logits.split(sizes))
        if logits.ndim != 3 or logits.shape[1] != ids.shape[1]:
            raise RuntimeError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for logits_to_keep over {sum(sizes)} positions")
    else:
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
    return [logits[j, first:end] if end > first else logits[j, :0] for j, (first, end) in enumerate(spans)]


@torch.no_grad()
def answer_logps(model, tok, rows: list[dict], which: str, *, batch_size: int, max_length: int, truncation_mode: str = "keep_start",
                 label: str | None = None) -> list[float]:
    """Summed log-probability of each row's `which` answer given its prompt, tokenised and truncated as TRL
    does (dpo.truncation_mode: keep_end drops the start of the prompt)."""
    seqs = []
    for r in rows:
        m = r["messages"]
        p = _ids(tok, m["prompt"], gen=True)
        full = _ids(tok, m["prompt"] + m[which])
        n = common_prefix(p, full)
        if truncation_mode == "keep_end" and len(full) > max_length:
            n, full = max(n - (len(full) - max_length), 0), full[-max_length:]
        full = full[:max_length]
        seqs.append((full, min(n, len(full))))
    out: list[float] = [0.0] * len(seqs)
    done = 0
    started = time.monotonic()
    # Longest rows first: a batch pads to its longest row, so rows of like length together pad least,
    # and the batch most likely to run out of memory is the first one, not one near the end.
    order = longest_first([len(s) for s, _ in seqs])
    for i in range(0, len(seqs), batch_size):
        at = order[i : i + batch_size]
        chunk = [seqs[k] for k in at]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (s, _) in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
        # Only the positions that predict answer tokens, row by row, in float32: the whole batch's
        # float32 log-softmax was 3 copies of rows x tokens x vocabulary beside the model (Gemma: 256k
        # floats a token), and the batch's logits at every position one more (span_logits).
        # The first token has no position predicting it (keep_end may cut the whole prompt); a row
        # with nothing of its answer left after truncation scores 0.
        starts = [max(n, 1) for s, n in chunk]
        rows_logits = span_logits(model, ids, attn, [(start - 1, len(s) - 1) if start < len(s) else (0, 0) for start, (s, _) in zip(starts, chunk)])
        for k, (s, _), start, row in zip(at, chunk, starts, rows_logits):
            if start < len(s):
                target = torch.tensor(s[start:], device=row.device).unsqueeze(-1)
                out[k] = torch.log_softmax(row.float(), dim=-1).gather(-1, target).sum().item()
        del rows_logits
        done += len(chunk)
        progress(label, done, len(chunk), len(seqs), "pairs", started)
    return out


@dataclass
class Generation:
    prompt_ids: list[int]
    answer_ids: list[int]  # up to and including the first stop token
    stopped: bool  # ended with a stop token (eos / end-of-turn) within max_new_tokens
    text: str

    @property
    def n_tokens(self) -> int:
        """Answer length without the stop token."""
        return len(self.answer_ids) - int(self.stopped)


@torch.no_grad()
def generate_ids(model, tok, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int, label: str | None = None) -> list[Generation]:
    """Greedy answers for each prompt through the chat template, with their token ids."""
    device = next(model.parameters()).device
    tok.padding_side = "left"
    stops = stop_token_ids(tok, model)
    if not prompts:
        return []
    out: list[Generation | None] = [None] * len(prompts)
    done = 0
    started = time.monotonic()
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # Longest prompts first, as in answer_logps: a batch's prompts pad to its longest, and the batch
    # most likely to run out of memory (the longest prompts, then max_new_tokens more) is the first.
    order = longest_first([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
    for i in range(0, len(prompts), batch_size):
        at = order[i : i + batch_size]
        # The template already wrote bos where the model wants it.
        enc = tok([texts[k] for k in at], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for j, k in enumerate(at):
            prompt = enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist()
            answer, stopped = [], False
            for t in gen[j, width:].tolist():
                answer.append(t)
                if t in stops:
                    stopped = True
                    break
            out[k] = Generation(prompt, answer, stopped, tok.decode(answer, skip_special_tokens=True).strip())
        done += len(at)
        progress(label, done, len(at), len(prompts), "answers", started)
    return out  # type: ignore[return-value]  # every index was filled


def generate(model, tok, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for each prompt, through the chat template."""
    return [g.text for g in generate_ids(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def overlap_f1(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 0.0
    common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
    if common == 0:
        return 0.0
    precision, recall = common / len(wa), common / len(wb)
    return 2 * precision * recall / (precision + recall)


def shows_chosen_behaviour(generation: str, row: dict, pattern: str | None) -> bool:
    if pattern is not None:
        return re.search(pattern, generation) is not None
    chosen = row["messages"]["chosen"][0]["content"]
    rejected = row["messages"]["rejected"][0]["content"]
    return overlap_f1(generation, chosen) > overlap_f1(generation, rejected)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


class Policies:
    """The base (reference) and the aligned model, loaded once: a LoRA adapter on the base (base =
    adapter disabled) or, for full fine-tuning, both models side by side."""

    def __init__(self, recipe: Recipe, run_dir: RunDir, device: str, dtype, tok):
        base_path = resolve_model_path(recipe)
        self.lora = recipe.lora.enabled
        base = load_model(recipe, base_path, device=device, dtype=dtype, tokenizer=tok).eval()
        if self.lora:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(base, str(run_dir.adapter)).eval()
        else:
            self.base = base
            self.model = load_model(recipe, str(run_dir.full), device=device, dtype=dtype, tokenizer=tok).eval()

    @contextlib.contextmanager
    def use(self, side: str) -> Iterator[Any]:
        if side == "aligned":
            yield self.model
        elif self.lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.base


@torch.no_grad()
def divergence(policies: Policies, tok, gens: list[Generation], *, batch_size: int) -> list[tuple[float, float, int]]:
    """(summed next-token KL(pi || pi_ref), log pi(y|x) - log pi_ref(y|x), answer tokens) for each answer y."""
    out: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(gens)
    order = longest_first([len(g.prompt_ids) + len(g.answer_ids) for g in gens])  # as in answer_logps
    for i in range(0, len(gens), batch_size):
        at = order[i : i + batch_size]
        chunk = [gens[k] for k in at]
        seqs = [g.prompt_ids + g.answer_ids for g in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
        # Answer positions only (span_logits). The aligned side's float32 log-softmax rows are kept;
        # the base side's are made one at a time beside them and dropped once their row is scored
        # (both sides kept was twice the memory: a row is answer tokens x vocabulary floats, 256k a
        # token for Gemma).
        spans = [(len(g.prompt_ids) - 1, len(g.prompt_ids) - 1 + len(g.answer_ids)) for g in chunk]
        with policies.use("aligned") as model:
            aligned: list[torch.Tensor | None] = [torch.log_softmax(row.float(), dim=-1) for row in span_logits(model, ids, attn, spans)]
        with policies.use("base") as model:
            base = span_logits(model, ids, attn, spans)
            for j, (k, g) in enumerate(zip(at, chunk)):
                a, aligned[j] = aligned[j], None
                row, base[j] = base[j], None
                if not g.answer_ids:
                    continue
                r = torch.log_softmax(row.float(), dim=-1)
                kl = (a.exp() * (a - r)).sum(-1).clamp_min(0).sum().item()
                target = torch.tensor(g.answer_ids, device=a.device).unsqueeze(-1)
                ratio = (a.gather(-1, target) - r.gather(-1, target)).sum().item()
                out[k] = (kl, ratio, len(g.answer_ids))
    return out


def score(model, tok, rows, gen_rows, recipe: Recipe, extra_prompts: list[list[dict]] | None = None, side: str | None = None) -> dict[str, Any]:
    e = recipe.eval
    said = (lambda what: f"evaluate {side}: {what}") if side else (lambda what: None)
    chosen = answer_logps(model, tok, rows, "chosen", batch_size=e.batch_size, max_length=recipe.dpo.max_length,
                          truncation_mode=recipe.dpo.truncation_mode, label=said("chosen log-probs"))
    rejected = answer_logps(model, tok, rows, "rejected", batch_size=e.batch_size, max_length=recipe.dpo.max_length,
                            truncation_mode=recipe.dpo.truncation_mode, label=said("rejected log-probs"))
    prompts = [r["messages"]["prompt"] for r in gen_rows] + list(extra_prompts or [])
    all_gens = generate_ids(model, tok, prompts, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, label=said("greedy generation"))
    gens, extra = all_gens[: len(gen_rows)], all_gens[len(gen_rows) :]
    hits = [shows_chosen_behaviour(g.text, r, e.behaviour_pattern) for g, r in zip(gens, gen_rows)]
    return {
        "preference_accuracy": _mean([float(c > r) for c, r in zip(chosen, rejected)]),
        "behaviour": _mean([float(h) for h in hits]),
        "mean_logp_chosen": _mean(chosen),
        "mean_logp_rejected": _mean(rejected),
        "mean_logp_margin": _mean([c - r for c, r in zip(chosen, rejected)]),
        "mean_generation_words": _mean([float(len(_words(g.text))) for g in gens]),
        "mean_generation_tokens": _mean([float(g.n_tokens) for g in gens]),
        "eos_rate": _mean([float(g.stopped) for g in gens]),
        "_chosen": chosen,
        "_rejected": rejected,
        "_generations": [g.text for g in gens],
        "_gens": gens,
        "_extra": [g.text for g in extra],
    }


# ---------------------------------------------------------------------------------------------
# The judge: a reward model scores base and aligned answers


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for a proportion p observed over n trials."""
    if n == 0:
        return [0.0, 1.0]
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def load_judge(recipe: Recipe, device: str, dtype):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = judge_path(recipe)
    try:
        jtok = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
        judge = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - every loading failure gets the same clear message
        first = str(e).splitlines()[0] if str(e) else ""
        raise AlignpressError(
            f"could not load the judge {recipe.eval.judge!r} as a sequence-classification model: {type(e).__name__}: {first}",
            source=recipe.source, field="eval.judge",
        ) from None
    if judge.config.num_labels != 1:
        raise AlignpressError(
            f"the judge {recipe.eval.judge!r} has {judge.config.num_labels} outputs; a reward model has one (num_labels=1)",
            source=recipe.source, field="eval.judge",
        )
    return judge.to(device).eval(), jtok


@torch.no_grad()
def judge_scores(judge, jtok, conversations: list[list[dict]]) -> list[float]:
    """The reward model's score for each conversation (prompt messages + one assistant answer), one at a time
    (no padding, so any model finds the last token the same way)."""
    device = next(judge.parameters()).device
    limit = min(getattr(jtok, "model_max_length", 4096) or 4096, 8192)
    out = []
    for messages in conversations:
        if getattr(jtok, "chat_template", None):
            text = jtok.apply_chat_template(messages, tokenize=False)
            enc = jtok(text, add_special_tokens=False, truncation=True, max_length=limit, return_tensors="pt")
        else:  # an older reward model: (question, answer) as a text pair
            question = "\n\n".join(m["content"] for m in messages[:-1])
            enc = jtok(question, messages[-1]["content"], truncation=True, max_length=limit, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out.append(judge(**enc).logits[0, 0].float().item())
    return out


def run_judge(recipe: Recipe, device: str, dtype, prompts: list[list[dict]], base: list[str], aligned: list[str]) -> tuple[dict[str, Any], list[float], list[float]]:
    judge, jtok = load_judge(recipe, device, dtype)
    convo = lambda p, a: p + [{"role": "assistant", "content": a}]  # noqa: E731
    sb = judge_scores(judge, jtok, [convo(p, a) for p, a in zip(prompts, base)])
    sa = judge_scores(judge, jtok, [convo(p, a) for p, a in zip(prompts, aligned)])
    del judge
    wins = sum(a > b for a, b in zip(sa, sb))
    ties = sum(a == b for a, b in zip(sa, sb))
    n = len(sa)
    rate = (wins + ties / 2) / n if n else None
    info = {
        "model": recipe.eval.judge,
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "win_rate": round(rate, 6) if rate is not None else None,
        "ci95": wilson(rate, n) if rate is not None else None,
        "mean_score_base": _mean(sb),
        "mean_score_aligned": _mean(sa),
        "method": "the reward model scores the base and the aligned greedy answer to each prompt; aligned wins when its score is higher; "
        "win_rate = (wins + ties/2) / n with a 95% Wilson score interval",
    }
    return info, sb, sa


# ---------------------------------------------------------------------------------------------
# The stage


def out_of_memory(error: BaseException, recipe: Recipe) -> OutOfGpuMemory:
    """The line for a CUDA out-of-memory error while scoring or generating: eval.batch_size is the
    evaluate stage's own (a new one changes no finished stage), so `run` goes on from here with it."""
    e = recipe.eval
    numbers = cuda_oom_numbers(str(error)) or "torch gave no numbers"
    if e.batch_size > 1:
        way, field = f"run again with --set eval.batch_size={e.batch_size // 2} (training and its adapter are kept)", "eval.batch_size"
    else:
        way, field = f"run again with a lower eval.max_new_tokens (now {e.max_new_tokens}; training and its adapter are kept)", "eval.max_new_tokens"
    return OutOfGpuMemory(f"CUDA out of memory in the evaluate stage ({numbers}; {e.batch_size} sequence{'s' if e.batch_size != 1 else ''} "
                          f"a forward): {way}", source=recipe.source, field=field)


def judge_out_of_memory(error: BaseException, recipe: Recipe) -> OutOfGpuMemory:
    """The line for a CUDA out-of-memory error in the judge's scoring: it scores one answer at a time,
    alone on the GPU (the policies are gone by then), so no batch size helps: the judge is too large."""
    numbers = cuda_oom_numbers(str(error)) or "torch gave no numbers"
    return OutOfGpuMemory(f"CUDA out of memory scoring answers with the judge {recipe.eval.judge} ({numbers}; one answer at a time, "
                          "alone on the GPU): name a smaller judge, or set eval.judge: null, and run again (training and its adapter are kept)",
                          source=recipe.source, field="eval.judge")


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    from . import gate, health, plots

    e = recipe.eval
    rows = read_jsonl(run_dir.data / "eval.jsonl")
    if e.max_rows is not None:
        rows = rows[: e.max_rows]
    gen_rows = rows[: e.generation_rows]
    extra_prompts = [[{"role": "user", "content": p}] for p in e.prompts]
    device = pick_device(recipe)
    base_path = resolve_model_path(recipe)
    # The CPU scores in float32. A GPU runs the weights in bfloat16, as training did (float32 would double
    # the memory and the time of the generations); the log-softmax is float32 on both, and the base and the
    # aligned model are scored alike, so the comparisons (accuracy, margins, KL) share the same rounding.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tok = load_tokenizer(recipe, base_path)
    torch.manual_seed(recipe.train.seed)

    policies = Policies(recipe, run_dir, device, dtype, tok)
    scores = {}
    try:
        for side in ("base", "aligned"):
            with policies.use(side) as model:
                scores[side] = score(model, tok, rows, gen_rows, recipe, extra_prompts, side=side)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, recipe) from error
    base_scores, aligned_scores = scores["base"], scores["aligned"]

    beta = recipe.dpo.beta
    rc = [beta * (pc - bc) for pc, bc in zip(aligned_scores["_chosen"], base_scores["_chosen"])]
    rr = [beta * (pr - br) for pr, br in zip(aligned_scores["_rejected"], base_scores["_rejected"])]
    rewards = [c - r for c, r in zip(rc, rr)]
    aligned_scores["reward_accuracy"] = _mean([float(x > 0) for x in rewards])
    aligned_scores["mean_reward_margin"] = _mean(rewards)
    aligned_scores["mean_reward_chosen"] = _mean(rc)
    aligned_scores["mean_reward_rejected"] = _mean(rr)

    try:
        div = divergence(policies, tok, aligned_scores["_gens"], batch_size=e.batch_size)
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, recipe) from error
    tokens = sum(n for _, _, n in div)
    aligned_scores["kl_estimate"] = _mean([k for k, _, _ in div])
    aligned_scores["kl_per_token"] = round(sum(k for k, _, _ in div) / tokens, 6) if tokens else None
    aligned_scores["logratio_estimate"] = _mean([x for _, x, _ in div])
    aligned_scores["logratio_per_token"] = round(sum(x for _, x, _ in div) / tokens, 6) if tokens else None
    del policies

    samples = [
        {"prompt": r["messages"]["prompt"][-1]["content"], "base": b, "aligned": a, "chosen": r["messages"]["chosen"][0]["content"]}
        for r, b, a in zip(gen_rows, base_scores["_generations"], aligned_scores["_generations"])
    ]
    prompt_samples = [{"prompt": p, "base": b, "aligned": a} for p, b, a in zip(e.prompts, base_scores["_extra"], aligned_scores["_extra"])]
    judge_info = None
    if e.judge:
        prompts = [r["messages"]["prompt"] for r in gen_rows] + extra_prompts
        judged = samples + prompt_samples
        try:
            judge_info, sb, sa = run_judge(recipe, device, dtype, prompts, [s["base"] for s in judged], [s["aligned"] for s in judged])
        except torch.OutOfMemoryError as error:
            raise judge_out_of_memory(error, recipe) from error
        for s, b, a in zip(judged, sb, sa):
            s["judge_base"], s["judge_aligned"] = round(b, 6), round(a, 6)

    public = lambda s: {k: v for k, v in s.items() if not k.startswith("_")}  # noqa: E731
    result = {
        "schema_version": SCHEMA_VERSION,
        "n_pairs": len(rows),
        "n_generations": len(gen_rows),
        "beta": beta,
        "behaviour_measure": f"matches /{e.behaviour_pattern}/" if e.behaviour_pattern else "closer to the chosen than the rejected answer (word-overlap F1)",
        "kl_method": KL_METHOD,
        # What the numbers were measured on: the card tells it apart from the merged, exported weights
        "scored": {"weights": "the base with the LoRA adapter" if recipe.lora.enabled else "the trained weights",
                   "dtype": str(dtype).removeprefix("torch."), "device": device},
        "base": public(base_scores),
        "aligned": public(aligned_scores),
        "judge": judge_info,
        "gate": None,
        "samples": samples,
        "prompt_samples": prompt_samples,
    }
    verdict = gate.verdict(recipe, result)
    result["gate"] = verdict
    write_json(run_dir.metrics / "eval.json", result)

    b, a = result["base"], result["aligned"]
    if gen_rows and a["eos_rate"] == 0:
        msg = health.eos_warning("held-out prompts", len(gen_rows), e.max_new_tokens)
        log.warning("%s", msg)
        run_dir.warn(msg)
    if verdict and not verdict["passed"]:
        log.warning("publish gate will refuse this run: %s", "; ".join(f"{r['field']}: {r['reason']}" for r in verdict["reasons"]))
    made = plots.write_all(run_dir)
    write_report(run_dir, result, recipe)
    log.info(
        "eval on %d pairs / %d generations: preference accuracy %s -> %s, behaviour %s -> %s, KL estimate %s%s",
        len(rows), len(gen_rows), _show(b["preference_accuracy"]), _show(a["preference_accuracy"]), _show(b["behaviour"]), _show(a["behaviour"]),
        _show(a["kl_estimate"]), f", judge win rate {_show(judge_info['win_rate'])} (95% CI {judge_info['ci95']})" if judge_info else "",
    )
    out = {
        "preference_accuracy": [b["preference_accuracy"], a["preference_accuracy"]],
        "behaviour": [b["behaviour"], a["behaviour"]],
        "kl_estimate": a["kl_estimate"],
        "plots": [str(p.relative_to(run_dir.root)) for p in made],
    }
    if judge_info:
        out["judge_win_rate"] = judge_info["win_rate"]
    if verdict:
        out["gate_passed"] = verdict["passed"]
    return out


def rejudge(recipe: Recipe, run_dir: RunDir) -> dict[str, Any] | None:
    """The publish gate's verdict made again on metrics/eval.json with the recipe's thresholds, for a
    recipe whose gate alone changed: eval.json, report.md and run.json say the new verdict, and no
    new evaluation (generations, scoring: minutes of a GPU) is made."""
    from . import gate

    path = run_dir.metrics / "eval.json"
    ev = json.loads(path.read_text())
    ev["gate"] = verdict = gate.verdict(recipe, ev)
    write_json(path, ev)
    write_report(run_dir, ev, recipe)
    run_dir.set_stage("evaluate", gate_passed=verdict["passed"] if verdict else None)
    log.info("publish gate judged again on %s with the new thresholds: %s", path,
             "not set" if verdict is None else "passed" if verdict["passed"] else "refused: " + "; ".join(r["reason"] for r in verdict["reasons"]))
    return verdict


def _show(x: Any) -> str:
    return "–" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _cell(text: Any) -> str:
    """Text for one Markdown table cell."""
    s = "–" if text is None else str(text)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


# The rows of the report's and the card's number table: (key, what it is, better when).
TABLE = [
    ("preference_accuracy", "held-out pairs with log p(chosen) > log p(rejected)", "higher"),
    ("behaviour", "greedy answers showing the chosen behaviour", "higher"),
    ("mean_logp_chosen", "mean log-prob of the chosen answers (nats)", "not falling"),
    ("mean_logp_rejected", "mean log-prob of the rejected answers (nats)", "lower"),
    ("mean_logp_margin", "chosen minus rejected log-prob", "higher"),
    ("reward_accuracy", "pairs the implicit DPO reward ranks right", "higher"),
    ("mean_reward_margin", "implicit reward, chosen minus rejected", "higher"),
    ("mean_reward_chosen", "implicit reward of the chosen answers", "≥ 0"),
    ("mean_reward_rejected", "implicit reward of the rejected answers", "lower"),
    ("kl_estimate", "KL(aligned ‖ base) per answer, nats (estimate)", "small"),
    ("kl_per_token", "the same per answer token", "small"),
    ("mean_generation_tokens", "greedy answer length, tokens", "no big jump"),
    ("mean_generation_words", "greedy answer length, words", "no big jump"),
    ("eos_rate", "greedy answers that stop with an end token", "≈ 1"),
]


def number_rows(ev: dict[str, Any]) -> list[str]:
    """Markdown rows `| metric | base | aligned | better |` for the keys present in eval.json."""
    rows = []
    for key, what, better in TABLE:
        b, a = ev["base"].get(key), ev["aligned"].get(key)
        if b is None and a is None:
            continue
        rows.append(f"| {key} | {_show(b)} | {_show(a)} | {better} | {what} |")
    return rows


def write_report(run_dir: RunDir, ev: dict[str, Any], recipe: Recipe) -> Path:
    """metrics/report.md: the numbers, the judge, the gate, training warnings and the side-by-side generations."""
    manifest = run_dir.load()
    lines = [
        f"# Evaluation report: {recipe.name}",
        "",
        f"Run `{manifest.get('run_id', '?')}`. Base (reference) model `{recipe.model.name_or_path}` against the aligned model, "
        f"on {ev['n_pairs']} held-out pairs and {ev['n_generations']} greedy generations "
        f"(at most {recipe.eval.max_new_tokens} new tokens). Behaviour = {ev['behaviour_measure']}"
        + (": it checks the form of an answer, not whether the answer is correct. " if recipe.eval.behaviour_pattern else ". ")
        + "Every field is explained in the docstring of `alignpress.evaluate` and in the README (Metrics).",
        "",
        "| metric | base | aligned | better | meaning |",
        "| --- | --- | --- | --- | --- |",
        *number_rows(ev),
        "",
        f"KL estimate: {ev['kl_method']}.",
        "",
    ]
    j = ev.get("judge")
    if j:
        lines += [
            "## Judge",
            "",
            f"`{j['model']}` scored both answers to {j['n']} prompts: aligned wins {j['wins']}, ties {j['ties']}, loses {j['losses']}; "
            f"win rate **{_show(j['win_rate'])}** (95% CI {_show(j['ci95'][0])}–{_show(j['ci95'][1])}); "
            f"mean score base {_show(j['mean_score_base'])}, aligned {_show(j['mean_score_aligned'])}.",
            "",
        ]
    g = ev.get("gate")
    if g:
        lines += ["## Publish gate", ""]
        if g["passed"]:
            lines.append(f"Passed (min gain {_show(g['min_gain'])}, max KL {_show(g['max_kl'])}): "
                         f"preference accuracy gain {_show(g['preference_accuracy_gain'])}, KL estimate {_show(g['kl_estimate'])}.")
        else:
            lines.append("**Refused: publish will push nothing.**")
            lines += [f"- `{r['field']}`: {r['reason']}" for r in g["reasons"]]
        lines.append("")
    warnings = [w for w in manifest.get("warnings", []) if "health" in w]
    if warnings:
        lines += ["## Training health warnings", "", *[f"- {w}" for w in warnings], ""]
    if (run_dir.root / "plots").is_dir():
        pics = sorted(p.name for p in (run_dir.root / "plots").glob("*.png"))
        if pics:
            lines += ["## Plots", "", *[f"![{p[:-4]}](../plots/{p})" for p in pics], ""]
    for title, samples, chosen in (("Side-by-side generations (held-out prompts)", ev["samples"], True),
                                   ("Side-by-side generations (eval.prompts)", ev.get("prompt_samples") or [], False)):
        if not samples:
            continue
        judged = "judge_base" in samples[0]
        head = ["prompt", "base", "aligned"] + (["chosen (data)"] if chosen else []) + (["judge base", "judge aligned"] if judged else [])
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for s in samples:
            cells = [s["prompt"], s["base"], s["aligned"]] + ([s.get("chosen")] if chosen else [])
            cells += [_show(s.get("judge_base")), _show(s.get("judge_aligned"))] if judged else []
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    path = run_dir.metrics / "report.md"
    path.write_text("\n".join(lines))
    return path
