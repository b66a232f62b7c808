"""Stage 1, prepare: dataset -> normalised, filtered, rendered pairs.

Reads: the recipe's `data` section and the model's tokenizer (no model weights).
Writes: data/train.jsonl, data/eval.jsonl (one pair a line: rendered prompt/chosen/rejected
text, token counts, and the messages training uses) and data/stats.json (format, rows each
filter removed, token statistics).

Token counts follow TRL's DPO tokenisation exactly: the prompt is rendered with the generation
prompt, each answer is the rest of the rendered whole conversation, and the boundary is where
the two token sequences first differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
from pathlib import Path
from typing import Any

from .errors import AlignpressError
from .formats import RowError, check_columns, common_prefix, detect_format, normalise_row
from .recipe import Recipe, token_cap
from .runstate import RunDir, write_json

log = logging.getLogger("alignpress")

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------
# Loading


def load_split(recipe: Recipe, split: str, field_name: str):
    """A `datasets.Dataset` for one split (with slice) of a local file or a Hub dataset."""
    import datasets

    name = recipe.data.dataset
    path = Path(recipe.resolve_path(name))
    suffix = "".join(path.suffixes[-1:]).lower()
    is_local = path.exists() or suffix in LOCAL_BUILDERS or name.startswith((".", "/", "~"))
    datasets.disable_progress_bars()
    if is_local:
        if not path.exists():
            raise AlignpressError(f"data file {name!r} not found (resolved to {path})", source=recipe.source, field="data.dataset")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_BUILDERS)
            if not files:
                raise AlignpressError(f"folder {path} has no .jsonl/.json/.parquet/.csv files", source=recipe.source, field="data.dataset")
            suffix = files[0].suffix.lower()
            data_files = [str(p) for p in files if p.suffix.lower() == suffix]
        else:
            if suffix not in LOCAL_BUILDERS:
                raise AlignpressError(f"unsupported data file type {suffix!r}; use .jsonl, .json, .parquet or .csv", source=recipe.source, field="data.dataset")
            data_files = [str(path)]
        if not split.split("[")[0] == "train":
            raise AlignpressError(f"a local file has one split, 'train'; got {split!r}", source=recipe.source, field=field_name)
        try:
            return datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files={"train": data_files}, split=split)
        except Exception as e:  # noqa: BLE001
            raise AlignpressError(f"could not read {path}: {type(e).__name__}: {_first_line(e)}", source=recipe.source, field="data.dataset") from None
    try:
        return datasets.load_dataset(name, recipe.data.config_name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise AlignpressError(f"{split!r}: {_first_line(e)}", source=recipe.source, field=field_name) from None
        raise AlignpressError(f"could not load Hub dataset {name!r}: {_first_line(e)}", source=recipe.source, field="data.dataset") from None
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: one clear message
        raise AlignpressError(
            f"could not load Hub dataset {name!r}: {type(e).__name__}: {_first_line(e)}. "
            "Check the id, your network (HF_HUB_OFFLINE), and HF_TOKEN for gated datasets; or point data.dataset at a local file",
            source=recipe.source,
            field="data.dataset",
        ) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------
# Rendering


def render_pair(tok, pair: dict[str, list[dict]]) -> dict[str, Any]:
    """Render one normalised pair through the chat template, with TRL's prompt/answer boundary."""

    def ids(messages, gen=False):
        return tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]

    def text(messages, gen=False):
        return tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    p_ids, c_ids, r_ids = ids(prompt, gen=True), ids(prompt + chosen), ids(prompt + rejected)
    n = min(common_prefix(p_ids, c_ids), common_prefix(p_ids, r_ids))
    p_text, c_text, r_text = text(prompt, gen=True), text(prompt + chosen), text(prompt + rejected)
    cut = len(p_text) if c_text.startswith(p_text) and r_text.startswith(p_text) else 0
    return {
        "prompt": p_text,
        "chosen": c_text[cut:],
        "rejected": r_text[cut:],
        "prompt_tokens": n,
        "chosen_tokens": len(c_ids) - n,
        "rejected_tokens": len(r_ids) - n,
        "messages": pair,
    }


def show_pair(tok, row: dict[str, Any]) -> str:
    """One rendered pair with the prompt/answer boundary marked by ' ║ '."""
    prompt = row["messages"]["prompt"]
    full = tok.apply_chat_template(prompt + row["messages"]["chosen"], tokenize=True, return_dict=True)["input_ids"]
    n = row["prompt_tokens"]
    pieces = tok.convert_ids_to_tokens(full)
    return "\n".join(
        [
            "One rendered pair (text, then tokens; ║ marks where the answer starts):",
            f"  prompt   {row['prompt']!r}",
            f"  chosen   {row['chosen']!r}",
            f"  rejected {row['rejected']!r}",
            f"  tokens   {' '.join(pieces[:n])} ║ {' '.join(pieces[n:])}",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Filtering


class SplitReport:
    def __init__(self, loaded: int):
        self.loaded = loaded
        self.filters: list[dict[str, Any]] = []

    def record(self, name: str, before: int, after: int, example: str | None = None) -> None:
        entry: dict[str, Any] = {"filter": name, "removed": before - after}
        if example and before != after:
            entry["example"] = example
        self.filters.append(entry)

    def as_dict(self, kept: int) -> dict[str, Any]:
        return {"loaded": self.loaded, "filters": self.filters, "kept": kept}


def _threshold(rows, recipe: Recipe, report: SplitReport, columns: list[str]):
    for kind, table in (("min", recipe.data.filters.min), ("max", recipe.data.filters.max)):
        for column, bound in table.items():
            if column not in columns:
                raise AlignpressError(
                    f"column {column!r} is not in the data (columns: {', '.join(sorted(columns))})",
                    source=recipe.source,
                    field=f"data.filters.{kind}.{column}",
                )
            before = len(rows)
            if kind == "min":
                rows = [r for r in rows if r[column] is not None and r[column] >= bound]
            else:
                rows = [r for r in rows if r[column] is not None and r[column] <= bound]
            report.record(f"{column} {'>=' if kind == 'min' else '<='} {bound:g}", before, len(rows))
    return rows


def process_split(recipe: Recipe, tok, ds, fmt: str, report: SplitReport) -> list[dict[str, Any]]:
    f = recipe.data.filters
    columns = list(ds.column_names)
    rows = ds.to_list()
    rows = _threshold(rows, recipe, report, columns)

    pairs, bad = [], None
    for r in rows:
        try:
            pairs.append(normalise_row(fmt, r))
        except RowError as e:
            bad = bad or str(e)
    report.record(f"malformed for format {fmt}", len(rows), len(pairs), bad)

    if f.max_messages is not None:
        before = len(pairs)
        pairs = [p for p in pairs if len(p["prompt"]) + 1 <= f.max_messages]
        report.record(f"more than {f.max_messages} messages", before, len(pairs))
    if f.drop_empty:
        before = len(pairs)
        pairs = [p for p in pairs if p["chosen"][0]["content"].strip() and p["rejected"][0]["content"].strip()]
        report.record("empty answer", before, len(pairs))
    if f.drop_identical:
        before = len(pairs)
        pairs = [p for p in pairs if p["chosen"][0]["content"].strip() != p["rejected"][0]["content"].strip()]
        report.record("chosen identical to rejected", before, len(pairs))
    if f.drop_duplicates:
        before, seen, kept = len(pairs), set(), []
        for p in pairs:
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(p)
        pairs = kept
        report.record("duplicate pair", before, len(pairs))

    rendered, bad = [], None
    for p in pairs:
        try:
            rendered.append(render_pair(tok, p))
        except Exception as e:  # noqa: BLE001 - the template refused this conversation (e.g. a system turn for Gemma)
            bad = bad or f"{type(e).__name__}: {e}"
    report.record("rejected by the chat template", len(pairs), len(rendered), bad)

    cap = token_cap(recipe)  # data.filters.max_tokens, else dpo.max_length: TRL never cuts a kept pair
    before = len(rendered)
    rendered = [r for r in rendered if r["prompt_tokens"] + max(r["chosen_tokens"], r["rejected_tokens"]) <= cap]
    report.record(f"longer than {cap} tokens", before, len(rendered))
    return rendered


def _token_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"pairs": 0}

    def summary(key):
        values = [r[key] for r in rows]
        return {"mean": round(statistics.fmean(values), 2), "median": statistics.median(values), "max": max(values)}

    return {
        "pairs": len(rows),
        "prompt": summary("prompt_tokens"),
        "chosen": summary("chosen_tokens"),
        "rejected": summary("rejected_tokens"),
        # Tokens one epoch puts through the policy: prompt + answer, for both answers.
        "tokens_per_epoch": sum(2 * r["prompt_tokens"] + r["chosen_tokens"] + r["rejected_tokens"] for r in rows),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# The stage


def run(recipe: Recipe, run_dir: RunDir, tok) -> dict[str, Any]:
    d = recipe.data
    train_ds = load_split(recipe, d.split, "data.split")
    eval_ds = load_split(recipe, d.eval_split, "data.eval_split") if d.eval_split else None
    columns = list(train_ds.column_names)
    if len(train_ds) == 0:
        raise AlignpressError(f"split {d.split!r} has no rows", source=recipe.source, field="data.split")
    if d.format == "auto":
        fmt, how = detect_format(columns, train_ds[0]), "detected"
    else:
        fmt, how = d.format, "from the recipe"
    check_columns(fmt, columns, recipe.source)
    log.info("data: %s, %d rows in %s; format %s (%s)", d.dataset, len(train_ds), d.split, fmt, how)

    train_report = SplitReport(len(train_ds))
    train = process_split(recipe, tok, train_ds, fmt, train_report)
    if eval_ds is not None:
        eval_report = SplitReport(len(eval_ds))
        evals = process_split(recipe, tok, eval_ds, fmt, eval_report)
    else:
        fraction = d.eval_fraction if d.eval_fraction is not None else 0.1
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_eval = max(1, round(len(train) * fraction)) if len(train) > 1 else 0
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        eval_report = SplitReport(len(evals))
        train_report.record(f"held out for evaluation ({fraction:g}, seed {d.seed})", len(train) + len(evals), len(train))

    # A prompt seen in training says nothing about held-out behaviour.
    eval_prompts = {json.dumps(r["messages"]["prompt"], sort_keys=True) for r in evals}
    before = len(train)
    train = [r for r in train if json.dumps(r["messages"]["prompt"], sort_keys=True) not in eval_prompts]
    train_report.record("prompt also in the eval split", before, len(train))

    for rows, cap, report in ((train, d.max_train_rows, train_report), (evals, d.max_eval_rows, eval_report)):
        if cap is not None and len(rows) > cap:
            rng = random.Random(d.seed)
            keep = sorted(rng.sample(range(len(rows)), cap))
            before = len(rows)
            rows[:] = [rows[i] for i in keep]
            report.record(f"over the row cap ({cap})", before, len(rows))

    if not train:
        steps = "; ".join(f"{x['filter']}: -{x['removed']}" for x in train_report.filters if x["removed"])
        raise AlignpressError(
            f"no training rows left after filtering ({train_report.loaded} loaded; {steps})",
            source=recipe.source,
            field="data.filters",
        )
    if not evals:
        log.warning("no evaluation rows: the evaluate stage will have nothing to score")

    tmp = run_dir.partial(run_dir.data)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "eval.jsonl", evals)
    fingerprint = hashlib.sha256((tmp / "train.jsonl").read_bytes() + b"\0" + (tmp / "eval.jsonl").read_bytes()).hexdigest()
    stats = {
        "dataset": d.dataset,
        "format": fmt,
        "format_source": how,
        "splits": {"train": train_report.as_dict(len(train)), "eval": eval_report.as_dict(len(evals))},
        "tokens": {"train": _token_stats(train), "eval": _token_stats(evals)},
        "fingerprint": fingerprint,
    }
    write_json(tmp / "stats.json", stats)
    run_dir.commit(tmp, run_dir.data)

    for split, report in (("train", train_report), ("eval", eval_report)):
        for x in report.filters:
            if x["removed"]:
                log.info("  %s: removed %d (%s)", split, x["removed"], x["filter"])
    log.info("data: %d training pairs, %d eval pairs written to %s", len(train), len(evals), run_dir.data)
    print(show_pair(tok, train[0]), flush=True)
    return {"format": fmt, "train_pairs": len(train), "eval_pairs": len(evals), "fingerprint": fingerprint}
