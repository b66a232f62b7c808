"""Stage 3, evaluate: the base (reference) model against the aligned model on held-out pairs.

Reads: data/eval.jsonl, the base model, adapter/ (or full/).
Writes: metrics/eval.json with top-level `base` and `aligned`, each holding
- preference_accuracy: share of held-out pairs whose chosen answer has a higher summed
  log-probability than the rejected one (higher is better);
- behaviour: share of greedy generations showing the chosen behaviour: matching
  eval.behaviour_pattern when the recipe gives one, else closer (word-overlap F1) to the
  chosen answer than to the rejected one (higher is better);
- mean_logp_chosen, mean_logp_rejected, mean_logp_margin, mean_generation_words;
and for `aligned` also reward_accuracy and mean_reward_margin: DPO's implicit reward
beta * (log pi(y|x) - log pi_ref(y|x)), chosen against rejected.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
from typing import Any

import torch

from .modeling import load_model, load_tokenizer, pick_device, resolve_model_path, stop_token_ids
from .prepare import read_jsonl
from .recipe import Recipe
from .runstate import RunDir, write_json

log = logging.getLogger("alignpress")


def _ids(tok, messages, gen=False) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def answer_logps(model, tok, rows: list[dict], which: str, *, batch_size: int, max_length: int) -> list[float]:
    """Summed log-probability of each row's `which` answer given its prompt, tokenised as TRL does."""
    device = next(model.parameters()).device
    seqs = []
    for r in rows:
        m = r["messages"]
        p = _ids(tok, m["prompt"], gen=True)
        full = _ids(tok, m["prompt"] + m[which])
        n = _prefix(p, full)
        full = full[:max_length]
        seqs.append((full, min(n, len(full))))
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        answer = torch.zeros((len(chunk), width), dtype=torch.bool)
        for j, (s, n) in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
            answer[j, n : len(s)] = True
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        mask = answer[:, 1:].to(device)
        out.extend((logp * mask).sum(-1).tolist())
    return out


@torch.no_grad()
def generate(model, tok, prompts: list[list[dict]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for each prompt, through the chat template."""
    device = next(model.parameters()).device
    tok.padding_side = "left"
    outs: list[str] = []
    stops = stop_token_ids(tok, model)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chunk]
        # The template already wrote bos where the model wants it.
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        outs.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return [o.strip() for o in outs]


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


def _mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 6) if values else float("nan")


def score(model, tok, rows, gen_rows, recipe: Recipe) -> dict[str, Any]:
    e = recipe.eval
    chosen = answer_logps(model, tok, rows, "chosen", batch_size=e.batch_size, max_length=recipe.dpo.max_length)
    rejected = answer_logps(model, tok, rows, "rejected", batch_size=e.batch_size, max_length=recipe.dpo.max_length)
    gens = generate(model, tok, [r["messages"]["prompt"] for r in gen_rows], max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    hits = [shows_chosen_behaviour(g, r, e.behaviour_pattern) for g, r in zip(gens, gen_rows)]
    return {
        "preference_accuracy": _mean([float(c > r) for c, r in zip(chosen, rejected)]),
        "behaviour": _mean([float(h) for h in hits]),
        "mean_logp_chosen": _mean(chosen),
        "mean_logp_rejected": _mean(rejected),
        "mean_logp_margin": _mean([c - r for c, r in zip(chosen, rejected)]),
        "mean_generation_words": _mean([float(len(_words(g))) for g in gens]),
        "_chosen": chosen,
        "_rejected": rejected,
        "_generations": gens,
    }


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    rows = read_jsonl(run_dir.data / "eval.jsonl")
    if recipe.eval.max_rows is not None:
        rows = rows[: recipe.eval.max_rows]
    gen_rows = rows[: recipe.eval.generation_rows]
    device = pick_device(recipe)
    base_path = resolve_model_path(recipe)
    # Score in float32: small log-prob differences decide preference accuracy.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tok = load_tokenizer(recipe, base_path)
    torch.manual_seed(recipe.train.seed)

    if recipe.lora.enabled:
        from peft import PeftModel

        base = load_model(recipe, base_path, device=device, dtype=dtype, tokenizer=tok)
        model = PeftModel.from_pretrained(base, str(run_dir.adapter)).eval()
        with model.disable_adapter():
            base_scores = score(model, tok, rows, gen_rows, recipe)
        aligned_scores = score(model, tok, rows, gen_rows, recipe)
    else:
        base = load_model(recipe, base_path, device=device, dtype=dtype, tokenizer=tok).eval()
        base_scores = score(base, tok, rows, gen_rows, recipe)
        del base
        model = load_model(recipe, str(run_dir.full), device=device, dtype=dtype, tokenizer=tok).eval()
        aligned_scores = score(model, tok, rows, gen_rows, recipe)

    beta = recipe.dpo.beta
    rewards = [
        beta * ((pc - rc) - (pr - rr))
        for pc, pr, rc, rr in zip(aligned_scores["_chosen"], aligned_scores["_rejected"], base_scores["_chosen"], base_scores["_rejected"])
    ]
    aligned_scores["reward_accuracy"] = _mean([float(x > 0) for x in rewards])
    aligned_scores["mean_reward_margin"] = _mean(rewards)
    samples = [
        {"prompt": r["messages"]["prompt"][-1]["content"], "base": b, "aligned": a, "chosen": r["messages"]["chosen"][0]["content"]}
        for r, b, a in zip(gen_rows, base_scores["_generations"], aligned_scores["_generations"])
    ]
    public = lambda s: {k: v for k, v in s.items() if not k.startswith("_")}  # noqa: E731
    result = {
        "n_pairs": len(rows),
        "n_generations": len(gen_rows),
        "behaviour_measure": f"matches /{recipe.eval.behaviour_pattern}/" if recipe.eval.behaviour_pattern else "closer to the chosen than the rejected answer (word-overlap F1)",
        "base": public(base_scores),
        "aligned": public(aligned_scores),
        "samples": samples,
    }
    write_json(run_dir.metrics / "eval.json", result)
    b, a = result["base"], result["aligned"]
    log.info(
        "eval on %d pairs / %d generations: preference accuracy %.3f -> %.3f, behaviour %.3f -> %.3f",
        len(rows), len(gen_rows), b["preference_accuracy"], a["preference_accuracy"], b["behaviour"], a["behaviour"],
    )
    return {"preference_accuracy": [b["preference_accuracy"], a["preference_accuracy"]], "behaviour": [b["behaviour"], a["behaviour"]]}
