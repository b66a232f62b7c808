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

import dataclasses
import hashlib
import json
import logging
import random
import re
import statistics
from pathlib import Path
from typing import Any, Iterator

from .errors import AlignpressError, first_line
from .formats import DETECT_ROWS, RowError, check_columns, common_prefix, describe_value, detect_format, normalise_row
from .recipe import DATA_COLUMNS, DEFAULT_EVAL_FRACTION, FilterSection, Recipe, SourceSection, data_sources, token_cap
from .runstate import RunDir, write_json

log = logging.getLogger("alignpress")

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class Rows:
    """One loaded split of one source: its rows as dicts, and where they came from (for messages)."""

    label: str  # the data file, or the Hub dataset id: the `FILE` of data errors
    split: str
    offset: int  # index of rows[0] in the file or Hub split, so messages give the row's own index
    columns: list[str]  # as the layout sees them (after the column mapping)
    rows: list[dict[str, Any]]
    file_columns: list[str] = dataclasses.field(default_factory=list)  # as in the data (filters may name these)
    whole: int = 0  # rows in the whole split, before the slice

    def where(self, i: int) -> str:
        return f"row {self.offset + i}"


def local_data_files(recipe: Recipe, src: SourceSection, prefix: str, split: str, field_name: str) -> tuple[Path, str, list[str]] | None:
    """For a source that is a local file or folder: (its path, the file type, the files to read),
    once they are found and the split is `train`; None for a Hub dataset id. Reads no data, so
    `validate` runs it too."""
    name = src.dataset
    ds_field = f"{prefix}.dataset"
    path = Path(recipe.resolve_path(name))
    suffix = "".join(path.suffixes[-1:]).lower()
    if not (path.exists() or suffix in LOCAL_BUILDERS or name.startswith((".", "/", "~"))):
        return None
    if not path.exists():
        raise AlignpressError(f"data file {name!r} not found (resolved to {path})", source=recipe.where(ds_field), field=ds_field)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_BUILDERS)
        if not files:
            raise AlignpressError(f"folder {path} has no .jsonl/.json/.parquet/.csv files", source=recipe.where(ds_field), field=ds_field)
        kinds = {LOCAL_BUILDERS[p.suffix.lower()]: p.name for p in files}
        if len(kinds) > 1:  # the first file's type used to be read and the others skipped without a word
            raise AlignpressError(f"folder {path} mixes file types ({', '.join(sorted(kinds.values()))}, ...): one type a folder, or "
                                  "one source each (data.datasets)", source=recipe.where(ds_field), field=ds_field)
        suffix = files[0].suffix.lower()
        data_files = [str(p) for p in files]
    else:
        if suffix not in LOCAL_BUILDERS:
            raise AlignpressError(f"unsupported data file type {suffix!r}; use .jsonl, .json, .parquet or .csv", source=recipe.where(ds_field), field=ds_field)
        data_files = [str(path)]
    if split.split("[")[0] != "train":
        raise AlignpressError(f"a local file has one split, 'train'; got {split!r}", source=recipe.where(field_name), field=field_name)
    if src.config_name is not None:  # load_dataset reads local files without one: it was ignored
        raise AlignpressError(f"a local file has no configurations; {src.config_name!r} would be ignored: leave it unset",
                              source=recipe.where(f"{prefix}.config_name"), field=f"{prefix}.config_name")
    return path, suffix, data_files


def check_data_sources(recipe: Recipe, hub: bool = False) -> str:
    """`validate`'s data check. A local source is read as prepare reads it, up to the steps that need
    the tokenizer: the file, the split and its slice, the column mapping, the format's columns, the
    rating filters' columns and values (a filter that keeps no training row is refused). A Hub
    dataset is left to prepare, or with `hub` (`validate --hub`) asked about: see check_hub_dataset.
    Returns a note for the user."""
    notes = []
    # The eval rows the rating filters keep, per source: prepare refuses an evaluation of nothing
    # only when no source holds out any row (a source without eval_split holds out training rows).
    eval_reports, eval_kept, eval_fields, all_eval_known = [], 0, [], True
    for prefix, spec in data_sources(recipe.data):
        splits = [(spec.split, _field(recipe, prefix, "split"))]
        if spec.eval_split:
            splits.append((spec.eval_split, _field(recipe, prefix, "eval_split")))
        found = [local_data_files(recipe, spec, prefix, split, field) for split, field in splits][0]
        if found is None:
            all_eval_known = False
            notes.append(check_hub_dataset(recipe, prefix, spec, splits) if hub else f"{spec.dataset} (Hub dataset: read by prepare; `validate --hub` checks its card)")
            continue
        path, _, files = found
        size = sum(Path(f).stat().st_size for f in files)
        where = f"{path} ({len(files)} file{'s' if len(files) != 1 else ''}, {size / 1e6:.1f} MB)" if path.is_dir() else f"{path} ({size / 1e6:.1f} MB)"
        source = load_source(recipe, prefix, spec)
        counts = []
        for rows, must_keep in ((source.train, True), (source.eval, False)):
            if rows is not None:
                report = SplitReport(len(rows.rows))
                kept = _threshold(list(enumerate(rows.rows)), rows, source.spec.filters, source.filters_field, report, recipe, must_keep)
                # Rows the format cannot read, as prepare counts them (the chat template's refusals,
                # which prepare adds, need the tokenizer).
                _check_unusable(recipe, rows, len(kept), _normalise(kept, rows, source.fmt, [])[1], DroppedRows())
                filtered = f" ({len(kept)} after the rating filters)" if len(kept) != len(rows.rows) else ""
                counts.append(f"{len(rows.rows)} rows in {rows.split}{filtered}")
                if not must_keep:
                    eval_reports.append(report)
                    eval_kept += len(kept)
                    eval_fields.append(_field(recipe, prefix, "eval_split"))
        if source.eval is None:
            all_eval_known = False
        notes.append(f"{where}: {', '.join(counts)}; format {source.fmt} ({source.how})")
    if all_eval_known and eval_fields and not eval_kept and recipe.eval.enabled:
        # prepare's refusal (run): found here, before the model is built and the data rendered.
        total = _merge_reports(eval_reports, 0)
        removed = "; ".join(f"{x['filter']}: -{x['removed']}" for x in total["filters"] if x["removed"])
        raise AlignpressError(
            f"no evaluation rows left ({total['loaded']} loaded{'; ' + removed if removed else ''}): the evaluate stage "
            "would score nothing after training; hold out more rows, or set eval.enabled: false",
            source=recipe.source,
            field=eval_fields[0],
        )
    return "data: " + "; ".join(notes)


def dry_run(recipe: Recipe, tok) -> str:
    """`validate`'s last data check when the data is local and the tokenizer at hand: `run` (prepare)
    in a scratch folder, so every refusal prepare would make on a rented VM is made here (answers
    emptied or identical, duplicates, prompts also in the eval split, the chat template refusing
    rows, pairs over the token cap). Warnings show; nothing is written. Returns a note."""
    import contextlib
    import io
    import tempfile

    level = log.level
    log.setLevel(logging.WARNING)  # prepare's own progress lines: validate says what it found in one note
    try:
        with tempfile.TemporaryDirectory(prefix="alignpress-validate-") as scratch, contextlib.redirect_stdout(io.StringIO()):
            out = run(recipe, RunDir(Path(scratch)), tok)
    finally:
        log.setLevel(level)
    return f"prepare (run in a scratch folder): {out['train_pairs']} training pairs, {out['eval_pairs']} eval pairs; format {out['format']}"


def _card_info(card: dict[str, Any], config_name: str | None) -> dict[str, Any] | None:
    """The `dataset_info` entry (features, splits) of a dataset card for one config, as the
    datasets library writes it when it pushes a dataset: a mapping, or a list with config_name."""
    infos = card.get("dataset_info")
    infos = [infos] if isinstance(infos, dict) else [x for x in infos if isinstance(x, dict)] if isinstance(infos, list) else []
    if config_name is None and len(infos) == 1:
        return infos[0]
    return next((x for x in infos if x.get("config_name", "default") == (config_name or "default")), None)


def _card_configs(card: dict[str, Any]) -> list[str]:
    """The configuration names a dataset card declares (`configs:` or `dataset_info` entries)."""
    names = []
    for key in ("configs", "dataset_info"):
        value = card.get(key)
        for x in [value] if isinstance(value, dict) else value if isinstance(value, list) else []:
            if isinstance(x, dict) and (key == "configs" or "config_name" in x):
                names.append(str(x.get("config_name", "default")))
    return list(dict.fromkeys(names))


def check_hub_dataset(recipe: Recipe, prefix: str, src: SourceSection, splits: list[tuple[str, str]]) -> str:
    """`validate --hub` for a Hub dataset, before a cloud job is launched: it is found and readable
    with this token; where its card states splits and columns, each split exists, each slice has
    rows, and every column a mapping, a rating filter or the named format reads is there. Reads the
    dataset's metadata only, never its data."""
    from huggingface_hub import HfApi

    name, ds_field = src.dataset, f"{prefix}.dataset"
    try:
        info = HfApi().dataset_info(name)
    except Exception as e:  # noqa: BLE001 - missing, private, gated, offline: the library's reason
        raise AlignpressError(f"could not find Hub dataset {name!r}: {type(e).__name__}: {first_line(e)}. Check the id, your network, "
                              "and HF_TOKEN for gated or private datasets", source=recipe.where(ds_field), field=ds_field) from None
    card = info.card_data.to_dict() if info.card_data is not None else {}
    entry = _card_info(card, src.config_name)
    configs = _card_configs(card)
    config_field = f"{prefix}.config_name"
    if src.config_name is not None and configs and src.config_name not in configs:
        raise AlignpressError(f"{name!r} has no configuration {src.config_name!r} (its configurations, by its card: {', '.join(configs)})",
                              source=recipe.where(config_field), field=config_field)
    if src.config_name is None and len(configs) > 1 and "default" not in configs:
        raise AlignpressError(f"{name!r} has several configurations and none is the default: name one (its configurations, by its card: "
                              f"{', '.join(configs)})", source=recipe.where(config_field), field=config_field)
    if entry is None:
        return f"{name} (Hub dataset found; its card states no splits or columns{' for config ' + repr(src.config_name) if src.config_name else ''}: read by prepare)"
    sizes = {s.get("name"): s.get("num_examples") for s in entry.get("splits") or [] if isinstance(s, dict)}
    counts = []
    for split, field_name in splits:
        base = split.split("[")[0]
        if sizes and base not in sizes:
            raise AlignpressError(f"{name!r} has no split {base!r} (its splits: {', '.join(map(str, sizes))})", source=recipe.where(field_name), field=field_name)
        whole = sizes.get(base)
        if not isinstance(whole, int):
            continue
        rows = whole
        if "[" in split:
            import datasets

            (instr,) = datasets.ReadInstruction.from_spec(split).to_absolute({base: whole})
            rows = max(0, instr.to - instr.from_)
        training = field_name.endswith(".split")
        if rows == 0 and (training or recipe.eval.enabled):
            why = "" if training else ": the evaluate stage would score nothing after training; fix the slice, or set eval.enabled: false"
            raise AlignpressError(f"split {split!r} of {name} has no rows (the whole split has {whole}, by its card){why}",
                                  source=recipe.where(field_name), field=field_name)
        counts.append(f"{rows} rows in {split}")
    columns = [f.get("name") for f in entry.get("features") or [] if isinstance(f, dict)]
    if columns:
        listed = f"(its columns, by its card: {', '.join(sorted(columns))})"
        for key, column in src.columns.items():
            if column not in columns:
                raise AlignpressError(f"column {column!r} is not in {name} {listed}", source=recipe.where(f"{prefix}.columns.{key}"), field=f"{prefix}.columns.{key}")
        filters_field = f"{prefix}.filters" if prefix != "data" and recipe.data.datasets[_index(prefix)].filters is not None else "data.filters"
        for kind, table in (("min", src.filters.min), ("max", src.filters.max)):
            for column in table:
                if column not in columns and column not in src.columns:
                    field_name = f"{filters_field}.{kind}.{column}"
                    raise AlignpressError(f"column {column!r} is not in {name} {listed}", source=recipe.where(field_name), field=field_name)
        if src.format != "auto":
            check_columns(src.format, [*columns, *src.columns], recipe.where(_field(recipe, prefix, "format")), field=_field(recipe, prefix, "format"), data=name)
    what = ", ".join(counts) if counts else "split sizes not on its card"
    return f"{name} (Hub dataset, by its card: {what}; {f'{len(columns)} columns checked' if columns else 'columns not on its card'})"


def load_split(recipe: Recipe, src: SourceSection, prefix: str, split: str, field_name: str) -> Rows:
    """One split (with slice) of a local file or a Hub dataset, as Rows with the source's column mapping applied."""
    import datasets

    name = src.dataset
    ds_field = f"{prefix}.dataset"
    base = split.split("[")[0]
    datasets.disable_progress_bars()
    local = local_data_files(recipe, src, prefix, split, field_name)
    if local is not None:
        path, suffix, data_files = local
        label = str(path)
        try:
            ds = datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files={"train": data_files}, split="train")
        except Exception as e:  # noqa: BLE001
            if all(_has_no_rows(Path(file), suffix) for file in data_files):
                # datasets says StopIteration, or 'Instruction "train" corresponds to no data!'.
                raise AlignpressError(f"{path} has no rows", source=recipe.source, field=ds_field) from None
            for file in data_files if suffix in (".jsonl", ".json", ".csv") else []:
                problem = utf8_problem(Path(file)) or (json_file_problem(Path(file)) if suffix != ".csv" else None)
                if problem:
                    raise AlignpressError(problem, source=file) from None
            raise AlignpressError(f"could not read {path}: {_read_error(e)}", source=recipe.source, field=ds_field) from None
        _check_wrapped(ds, path, src, recipe, ds_field)
    else:
        label = name if base == "train" else f"{name} (split {base})"
        try:
            ds = datasets.load_dataset(name, src.config_name, split=base)
        except ValueError as e:
            if "split" in str(e).lower():
                raise AlignpressError(f"{split!r}: {first_line(e)}", source=recipe.source, field=field_name) from None
            raise AlignpressError(f"could not load Hub dataset {name!r}: {first_line(e)}", source=recipe.source, field=ds_field) from None
        except Exception as e:  # noqa: BLE001 - offline, missing, gated: one clear message
            raise AlignpressError(
                f"could not load Hub dataset {name!r}: {type(e).__name__}: {first_line(e)}. "
                f"Check the id, your network (HF_HUB_OFFLINE), and HF_TOKEN for gated datasets; or point {ds_field} at a local file",
                source=recipe.source,
                field=ds_field,
            ) from None
    # Slice here rather than in load_dataset, so every message can give a row's index in the whole split.
    offset, whole = 0, len(ds)
    if "[" in split:
        try:
            (instr,) = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(ds)})
        except (ValueError, AssertionError) as e:
            raise AlignpressError(f"{split!r}: {first_line(e)}", source=recipe.source, field=field_name) from None
        offset = instr.from_
        # A slice past the end is empty (datasets' select raised IndexError on it).
        ds = ds.select(range(instr.from_, instr.to) if instr.to > instr.from_ else [])
    loaded = Rows(label, split, offset, list(ds.column_names), _to_rows(ds, label, offset), list(ds.column_names), whole)
    if local is not None:
        _check_local_rows(loaded, local[1], local[2])
    return _map_columns(recipe, src, prefix, loaded)


def _check_wrapped(ds, path: Path, src: SourceSection, recipe: Recipe, ds_field: str) -> None:
    """One JSON object wrapping the rows ({"data": [...]}): datasets reads it as one row without a word."""
    if len(ds) != 1 or "chosen" in ds.column_names or src.columns:
        return
    row = ds[0]
    wrapped = [c for c, v in row.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if wrapped:
        raise AlignpressError(f"{path} is one JSON object whose {wrapped[0]!r} holds {len(row[wrapped[0]])} items, not rows of pairs: "
                              "write the rows one JSON object per line (.jsonl) or as a top-level array", source=recipe.source, field=ds_field)


def _check_local_rows(data: Rows, suffix: str, files: list[str]) -> None:
    """Empty rows, which datasets reads without a word: a `null` or `{}` line, a CSV line of commas."""
    empty = next((i for i, row in enumerate(data.rows) if all(v is None for v in row.values())), None)
    if empty is None:
        return
    for file in files if suffix in (".json", ".jsonl") else []:
        if problem := json_file_problem(Path(file)):
            raise AlignpressError(problem, source=file)
    raise AlignpressError(f"row {data.offset + empty}: empty (every column is null); remove it or fix the file", source=data.label)


def utf8_problem(path: Path) -> str | None:
    """`line N: ...` where a text data file stops being UTF-8 (a CSV saved as Latin-1: the reader
    said only "can't decode byte 0xe9 in position 3"), or None."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None  # null fits any column
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}[type(value)]


def json_file_problem(path: Path) -> str | None:
    """The first place a .jsonl/.json file cannot become a table, as `line N: why` (1-based, as an
    editor shows it), or None. Arrow's own message gives a row counted within a block, or none.

    JSON lines: each line one object, each top-level column of one JSON type throughout (null aside).
    A .json file that starts with `[`: one array of such objects."""
    text = path.read_text(encoding="utf-8", errors="replace")
    numbered: Iterator[tuple[str, Any]] = _json_lines(text)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
            numbered = ((f"item {i} of the array", row) for i, row in enumerate(rows if isinstance(rows, list) else []))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else an array ends before the file does: JSON lines whose first line is an array
                return f"line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})"
    kinds: dict[str, tuple[str, str]] = {}
    for where, row in numbered:
        if isinstance(row, json.JSONDecodeError):
            return f"{where}: not valid JSON: {row.msg} (column {row.colno}); each line must be one JSON object"
        if not isinstance(row, dict):
            return f"{where}: a JSON {_json_kind(row) or 'null'}, not an object with the pair's columns"
        for column, value in row.items():
            kind = _json_kind(value)
            if kind is None:
                continue
            first_kind, first_where = kinds.setdefault(column, (kind, where))
            if kind != first_kind:
                return f"{where}: column {column!r} is a JSON {kind}, but a JSON {first_kind} on {first_where}; one column holds one type"
    return None


def _has_no_rows(path: Path, suffix: str) -> bool:
    """Whether a local data file holds no rows: empty or blank lines only, `[]`, a CSV header alone,
    a parquet file of 0 rows."""
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except Exception:  # noqa: BLE001 - unreadable: the reader's own error says why
        return False
    if suffix == ".csv":
        return len(lines) <= 1
    return not lines or "".join(lines).replace(" ", "") == "[]"


def _json_lines(text: str) -> Iterator[tuple[str, Any]]:
    """(`line N`, the parsed line or its JSONDecodeError) for each non-blank line."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", e


def _read_error(e: BaseException) -> str:
    """The innermost cause's first line (Arrow's parse error, say), not the wrapper's."""
    while (e.__cause__ or e.__context__) is not None and str(e).startswith("An error occurred while generating the dataset"):
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {first_line(e)}"


def _to_rows(ds, label: str, offset: int) -> list[dict[str, Any]]:
    """The rows as dicts; text that is not UTF-8 (Arrow stores it undecoded) is named by row and column."""
    try:
        return ds.to_list()
    except UnicodeDecodeError:
        for i in range(len(ds)):
            for column in ds.column_names:
                try:
                    ds.select_columns([column])[i]
                except UnicodeDecodeError as e:
                    bad = e.object[e.start : e.start + 1]
                    raise AlignpressError(
                        f"row {offset + i}, column {column!r}: not UTF-8 text (byte 0x{bad.hex()} at byte {e.start} of the value); save the file as UTF-8",
                        source=label,
                    ) from None
        raise


def _map_columns(recipe: Recipe, src: SourceSection, prefix: str, data: Rows) -> Rows:
    """Copy each mapped column to its layout name (`columns: {prompt: question}`); the originals stay for filters."""
    if not src.columns:
        return data
    for key, column in src.columns.items():
        if column not in data.columns:
            raise AlignpressError(
                f"column {column!r} is not in {data.label} (its columns: {', '.join(sorted(data.columns))})",
                source=recipe.source,
                field=f"{prefix}.columns.{key}",
            )
    for row in data.rows:
        values = {key: row[column] for key, column in src.columns.items()}
        row.update(values)
    # A mapped-from column with a layout name (question -> prompt) must not also be read as itself.
    moved = {c for c in src.columns.values() if c in DATA_COLUMNS and c not in src.columns}
    data.columns = list(dict.fromkeys([c for c in data.columns if c not in moved] + list(src.columns)))
    return data


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
    # A template may skip a role without a word (Phi-3's first template had no system branch).
    # Assistant turns of the history are not checked: some templates rewrite them (reasoning dropped).
    for m in prompt:
        if m["role"] != "assistant" and m["content"].strip() not in p_text:
            raise ValueError(f"the chat template leaves out the {m['role']} message")
    # A template that does not write the assistant's message leaves DPO nothing to compare.
    for which, answer_ids in (("chosen", c_ids), ("rejected", r_ids)):
        if len(answer_ids) <= n:
            raise ValueError(f"the chat template renders the {which} answer as no tokens: it does not write the assistant's message")
    if chosen != rejected and c_ids == r_ids:
        raise ValueError("the chat template renders the chosen and rejected answers as the same tokens: it does not write the assistant's message")
    out = {
        "prompt": p_text,
        "chosen": c_text[cut:],
        "rejected": r_text[cut:],
        "prompt_tokens": n,
        "chosen_tokens": len(c_ids) - n,
        "rejected_tokens": len(r_ids) - n,
        "messages": pair,
    }
    if n < len(p_ids):  # the generation prompt's end that the rendered answers do not begin with (process_split warns)
        out["left_out"] = tok.decode(p_ids[n:])
    return out


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

    def record(self, name: str, before: int, after: int, example: str | None = None, rows: dict[str, list[int]] | None = None) -> None:
        entry: dict[str, Any] = {"filter": name, "removed": before - after}
        if example and before != after:
            entry["example"] = example
        if rows:
            entry["rows"] = rows
        self.filters.append(entry)

    def as_dict(self, kept: int) -> dict[str, Any]:
        return {"loaded": self.loaded, "filters": self.filters, "kept": kept}


# Rows named per reason in warnings, errors and stats.json.
EXAMPLE_ROWS = 3
STORED_ROWS = 20


def _examples(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:EXAMPLE_ROWS])) + (", …" if len(rows) > EXAMPLE_ROWS else "")


SHOWN_REASONS = 3  # in a message
STORED_REASONS = 20  # in data/stats.json


class DroppedRows:
    """Rows dropped for a reason (malformed, refused by the chat template): reason -> row indices."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[int]] = {}

    def add(self, reason: str, row: int) -> None:
        self.by_reason.setdefault(reason, []).append(row)

    def __len__(self) -> int:
        return sum(map(len, self.by_reason.values()))

    @property
    def first(self) -> str | None:
        return next(iter(self.by_reason), None)

    def _common(self) -> list[tuple[str, list[int]]]:
        # A reason quotes its row's value, so a column of bad values makes one reason a row: the
        # most frequent first, the rest counted, so the line stays one line (it grew with the data).
        return sorted(self.by_reason.items(), key=lambda kv: -len(kv[1]))

    def stored(self) -> dict[str, list[int]]:
        return {reason: rows[:STORED_ROWS] for reason, rows in self._common()[:STORED_REASONS]}

    def summary(self) -> str:
        """'reason (8 rows: 0, 1, 2, …); other reason (1 row: 5); 40 more reasons (52 rows)'"""
        common = self._common()
        parts = [f"{reason} ({len(rows)} row{'s' if len(rows) != 1 else ''}: {_examples(rows)})" for reason, rows in common[:SHOWN_REASONS]]
        if rest := common[SHOWN_REASONS:]:
            n = sum(len(rows) for _, rows in rest)
            parts.append(f"{len(rest)} more reason{'s' if len(rest) != 1 else ''} ({n} row{'s' if n != 1 else ''})")
        return "; ".join(parts)


def _number(value: Any, data: Rows, i: int, column: str, field: str) -> float | None:
    """A filter column's value as a number; numeric text counts (a CSV column with one word in it is all text)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise AlignpressError(f"{data.where(i)}, column {column!r}: {describe_value(value)} is not a number, and the filter {field} compares numbers", source=data.label)


def _threshold(items, data: Rows, filters: FilterSection, filters_field: str, report: SplitReport, recipe: Recipe, must_keep: bool = False):
    """The rating filters (filters.min / filters.max). With `must_keep` (a training split), a filter
    that keeps none of the rows reaching it is refused by name: it is a typo'd bound or column far
    more often than an intent, and it used to surface as "no training rows left" after rendering."""
    for kind, table in (("min", filters.min), ("max", filters.max)):
        for column, bound in table.items():
            field_name = f"{filters_field}.{kind}.{column}"
            if column not in data.columns and column not in data.file_columns:
                raise AlignpressError(
                    f"column {column!r} is not in {data.label} (its columns: {', '.join(sorted(set(data.columns) | set(data.file_columns)))})",
                    source=recipe.source,
                    field=field_name,
                )
            values = {i: _number(r[column], data, i, column, field_name) for i, r in items}
            before = len(items)
            if kind == "min":
                kept = [(i, r) for i, r in items if values[i] is not None and values[i] >= bound]
            else:
                kept = [(i, r) for i, r in items if values[i] is not None and values[i] <= bound]
            if must_keep and before and not kept:
                known = [v for v in values.values() if v is not None]
                seen = f"its values there run from {min(known):g} to {max(known):g}" if known else "it is empty in every one"
                earlier = " left by the filters before it" if before < len(data.rows) else ""
                raise AlignpressError(f"keeps none of the {before} rows of split {data.split!r} of {data.label}{earlier} ({column}: {seen})",
                                      source=recipe.source, field=field_name)
            items = kept
            report.record(f"{column} {'>=' if kind == 'min' else '<='} {bound:g}", before, len(items))
    return items


def special_texts(tok) -> list[str]:
    """The tokenizer's special tokens as text (<|end|>, <end_of_turn>, </s>): in a message's content the
    tokenizer turns them into the special ids, so an answer holding `<|end|>` ends its turn twice."""
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special]
    return sorted({t for t in [*tok.all_special_tokens, *added] if t and t.strip()})


def _special_in(pair: dict[str, list[dict]], specials: list[str]) -> str | None:
    for part in ("chosen", "rejected", "prompt"):
        for m in pair[part]:
            if found := next((t for t in specials if t in m["content"]), None):
                return f"{'the ' + m['role'] + ' message of the prompt' if part == 'prompt' else part} holds the special token {found!r} as text"
    return None


def _normalise(items, data: Rows, fmt: str, specials: list[str]) -> tuple[list[tuple[int, dict]], DroppedRows]:
    """Each (index, row) as a prompt/chosen/rejected pair of messages, and the rows that are not one."""
    pairs, malformed = [], DroppedRows()
    for i, r in items:
        try:
            pair = normalise_row(fmt, r)
        except RowError as e:
            malformed.add(str(e), data.offset + i)
            continue
        if found := _special_in(pair, specials):
            # The chat template writes the turn markers; text that already holds them (the seed notebook
            # appended "<|end|>\n" by hand) would be trained as extra ones
            malformed.add(f"{found} (the chat template writes it)", data.offset + i)
            continue
        pairs.append((i, pair))
    return pairs, malformed


def _check_unusable(recipe: Recipe, data: Rows, checked: int, malformed: DroppedRows, refused: DroppedRows) -> None:
    limit = recipe.data.max_malformed_fraction
    unusable = len(malformed) + len(refused)
    if checked and unusable / checked > limit:
        reasons = "; ".join(x for x in (malformed.summary(), refused.summary()) if x)
        # Most of them refused by the chat template: the template is the likelier fault, not the data.
        template = ""
        if len(refused) > len(malformed):
            which = f"model.chat_template ({recipe.model.chat_template})" if recipe.model.chat_template else f"the chat template of {recipe.model.name_or_path}"
            template = f". Most were refused by the chat template: check {which} with one of these rows"
        raise AlignpressError(
            f"{unusable} of {checked} rows of split {data.split!r} cannot be used, more than data.max_malformed_fraction "
            f"({limit:g}) allows: {reasons}{template}",
            source=data.label,
        )


def process_split(recipe: Recipe, tok, data: Rows, fmt: str, filters: FilterSection, filters_field: str, report: SplitReport,
                  training: bool = False) -> list[dict[str, Any]]:
    """Filter, normalise and render one split of one source. Every dropped row that is malformed or
    refused by the chat template is reported with its index and reason; too many of them refuse the data."""
    f = filters
    items = list(zip(range(len(data.rows)), data.rows))
    items = _threshold(items, data, f, filters_field, report, recipe, must_keep=training)
    checked = len(items)
    pairs, malformed = _normalise(items, data, fmt, special_texts(tok))
    report.record(f"malformed for format {fmt}", len(items), len(pairs), malformed.first, malformed.stored())
    if malformed:
        log.warning("%s, %s: dropped %d malformed row(s) for format %s: %s", data.label, data.split, len(malformed), fmt, malformed.summary())

    if f.max_messages is not None:
        before = len(pairs)
        pairs = [(i, p) for i, p in pairs if len(p["prompt"]) + 1 <= f.max_messages]
        report.record(f"more than {f.max_messages} messages", before, len(pairs))
    if f.drop_empty:
        before = len(pairs)
        pairs = [(i, p) for i, p in pairs if p["chosen"][0]["content"].strip() and p["rejected"][0]["content"].strip()]
        report.record("empty answer", before, len(pairs))
        before = len(pairs)
        # the turn being answered: with it empty the pair teaches answers to nothing
        pairs = [(i, p) for i, p in pairs if p["prompt"] and str(p["prompt"][-1].get("content") or "").strip()]
        report.record("empty prompt", before, len(pairs))
    if f.drop_identical:
        before = len(pairs)
        pairs = [(i, p) for i, p in pairs if p["chosen"][0]["content"].strip() != p["rejected"][0]["content"].strip()]
        report.record("chosen identical to rejected", before, len(pairs))
    if f.drop_duplicates:
        before, seen, kept = len(pairs), set(), []
        for i, p in pairs:
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append((i, p))
        pairs = kept
        report.record("duplicate pair", before, len(pairs))

    rendered, refused = [], DroppedRows()
    for i, p in pairs:
        try:
            rendered.append(render_pair(tok, p))
        except Exception as e:  # noqa: BLE001 - the template refused this conversation (e.g. a system turn for Gemma)
            refused.add(f"{type(e).__name__}: {first_line(e)}", data.offset + i)
    report.record("rejected by the chat template", len(pairs), len(rendered), refused.first, refused.stored())
    if refused:
        log.warning("%s, %s: the chat template refused %d row(s): %s", data.label, data.split, len(refused), refused.summary())
    left_out = [r.pop("left_out") for r in rendered if "left_out" in r]
    if left_out:
        # TRL trains from where the prompt alone and the conversation part (warning once, at training):
        # said here, before GPU time, with the count, since the model learns a context it will not see
        log.warning("%s, %s: in %d of %d rows the chat template ends the prompt alone with %r, which the rendered answers do not "
                    "begin with: training leaves it out, and generation (add_generation_prompt) puts it back",
                    data.label, data.split, len(left_out), len(rendered), max(set(left_out), key=left_out.count))

    _check_unusable(recipe, data, checked, malformed, refused)

    cap = token_cap(recipe, filters)  # the filters' max_tokens, else dpo.max_length: TRL never cuts a kept pair
    before = len(rendered)
    rendered = [r for r in rendered if r["prompt_tokens"] + max(r["chosen_tokens"], r["rejected_tokens"]) <= cap]
    report.record(f"longer than {cap} tokens", before, len(rendered))
    return rendered


def _merge_reports(reports: list[SplitReport], kept: int) -> dict[str, Any]:
    """Several sources' reports as one: rows loaded and removed by each filter, summed by filter name."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for x in report.filters:
            entry = merged.setdefault(x["filter"], {"filter": x["filter"], "removed": 0})
            entry["removed"] += x["removed"]
            if "example" in x and "example" not in entry:
                entry["example"] = x["example"]
    return {"loaded": sum(r.loaded for r in reports), "filters": list(merged.values()), "kept": kept}


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


@dataclasses.dataclass
class Source:
    """One entry of data.datasets (or the single data.dataset), loaded and with its format known."""

    prefix: str  # the recipe field of this source: data or data.datasets[i]
    spec: SourceSection
    train: Rows
    eval: Rows | None
    fmt: str
    how: str
    filters_field: str
    detect_rows: int  # rows whose value types format detection checked (0: the recipe named the format)

    def stats(self) -> dict[str, Any]:
        s = self.spec
        return {
            "field": self.prefix,
            "dataset": s.dataset,
            "file": self.train.label,
            "config_name": s.config_name,
            "split": s.split,
            "eval_split": s.eval_split,
            "format": self.fmt,
            "format_source": self.how,
            "format_rows_checked": self.detect_rows,
            "columns": dict(s.columns),
            "fraction": s.fraction,
            "max_rows": s.max_rows,
        }


def load_source(recipe: Recipe, prefix: str, spec: SourceSection) -> Source:
    """Load a source's splits and settle its format; every data error names the file, row and column."""
    split_field, eval_field = _field(recipe, prefix, "split"), _field(recipe, prefix, "eval_split")
    train = load_split(recipe, spec, prefix, spec.split, split_field)
    evals = load_split(recipe, spec, prefix, spec.eval_split, eval_field) if spec.eval_split else None
    if not train.rows:
        raise AlignpressError(f"split {spec.split!r} of {train.label} has no rows (the whole split has {train.whole})", source=recipe.source, field=split_field)
    if spec.format == "auto":
        sample = train.rows[:DETECT_ROWS]
        fmt, seen = detect_format(train.columns, sample, source=train.label, prefix=prefix)
        how, checked = "detected", len(sample)
        others = {f: rows for f, rows in seen.items() if f != fmt}
        if others:
            detail = "; ".join(f"{len(rows)} look like {f} (rows {_examples([train.offset + i for i in rows])})" for f, rows in others.items())
            log.warning("%s: format %s fits %d of the first %d rows; %s; they are checked as %s rows", train.label, fmt, len(seen[fmt]), len(sample), detail, fmt)
    else:
        fmt, how, checked = spec.format, "from the recipe", 0
        check_columns(fmt, train.columns, recipe.source, field=_field(recipe, prefix, "format"), data=train.label)
    if evals is not None and not evals.rows and recipe.eval.enabled:
        raise AlignpressError(f"split {spec.eval_split!r} of {evals.label} has no rows (the whole split has {evals.whole}): the evaluate "
                              "stage would score nothing after training; fix the slice, or set eval.enabled: false", source=recipe.source, field=eval_field)
    if evals is not None:
        check_columns(fmt, evals.columns, recipe.source, field=eval_field, data=f"{evals.label} split {spec.eval_split!r}")
    own_filters = prefix != "data" and recipe.data.datasets[_index(prefix)].filters is not None
    return Source(prefix, spec, train, evals, fmt, how, f"{prefix}.filters" if own_filters else "data.filters", checked)


def _index(prefix: str) -> int:
    return int(prefix.split("[")[1].rstrip("]"))


def _field(recipe: Recipe, prefix: str, name: str) -> str:
    """The recipe field a source's setting came from: its own, or the data.* default it inherited."""
    if prefix == "data" or getattr(recipe.data.datasets[_index(prefix)], name) is not None:
        return f"{prefix}.{name}"
    return f"data.{name}"


def _sample(rows: list, n: int, seed: int) -> list:
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def run(recipe: Recipe, run_dir: RunDir, tok) -> dict[str, Any]:
    d = recipe.data
    # Load every source and settle its format before rendering anything: bad input fails first.
    sources = [load_source(recipe, prefix, spec) for prefix, spec in data_sources(d)]
    for src in sources:
        how = f"detected from {src.detect_rows} rows" if src.detect_rows else src.how
        log.info("data: %s, %d rows in %s; format %s (%s)", src.spec.dataset, len(src.train.rows), src.spec.split, src.fmt, how)

    fraction = d.eval_fraction if d.eval_fraction is not None else DEFAULT_EVAL_FRACTION
    train_reports, eval_reports, train, evals = [], [], [], []
    for k, src in enumerate(sources):
        train_report = SplitReport(len(src.train.rows))
        rows = process_split(recipe, tok, src.train, src.fmt, src.spec.filters, src.filters_field, train_report, training=True)
        if src.eval is not None:
            eval_report = SplitReport(len(src.eval.rows))
            held = process_split(recipe, tok, src.eval, src.fmt, src.spec.filters, src.filters_field, eval_report)
        else:
            order = list(range(len(rows)))
            random.Random(d.seed).shuffle(order)
            n_eval = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
            chosen = set(order[:n_eval])
            held = [r for i, r in enumerate(rows) if i in chosen]
            rows = [r for i, r in enumerate(rows) if i not in chosen]
            eval_report = SplitReport(len(held))
            train_report.record(f"held out for evaluation ({fraction:g}, seed {d.seed})", len(rows) + len(held), len(rows))
        cap = src.spec.max_rows if src.spec.max_rows is not None else (max(1, round(len(rows) * src.spec.fraction)) if src.spec.fraction is not None else None)
        if cap is not None and len(rows) > cap:
            before = len(rows)
            rows = _sample(rows, cap, d.seed)
            what = f"max_rows {src.spec.max_rows}" if src.spec.max_rows is not None else f"fraction {src.spec.fraction:g}"
            train_report.record(f"over the source's {what}", before, len(rows))
        train += [(k, r) for r in rows]
        evals += [(k, r) for r in held]
        train_reports.append(train_report)
        eval_reports.append(eval_report)

    # Steps on the merged rows, recorded once.
    train_after, eval_after = SplitReport(0), SplitReport(0)
    # A prompt seen in training says nothing about held-out behaviour.
    eval_prompts = {json.dumps(r["messages"]["prompt"], sort_keys=True) for _, r in evals}
    before = len(train)
    train = [(k, r) for k, r in train if json.dumps(r["messages"]["prompt"], sort_keys=True) not in eval_prompts]
    train_after.record("prompt also in the eval split", before, len(train))

    for rows, cap, report in ((train, d.max_train_rows, train_after), (evals, d.max_eval_rows, eval_after)):
        if cap is not None and len(rows) > cap:
            before = len(rows)
            rows[:] = _sample(rows, cap, d.seed)
            report.record(f"over the row cap ({cap})", before, len(rows))

    train_total = _merge_reports(train_reports + [train_after], len(train))
    eval_total = _merge_reports(eval_reports + [eval_after], len(evals))
    if not train:
        removed = [x for x in train_total["filters"] if x["removed"]]
        steps = "; ".join(f"{x['filter']}: -{x['removed']}" for x in removed)
        # The field of the step that removed the most rows: not always a filter (a train split that
        # lies inside the eval split, a max_length that no pair fits).
        worst = max(removed, key=lambda x: x["removed"])["filter"] if removed else ""
        if worst.startswith("prompt also in the eval split"):
            field_name = "data.split"
        elif worst.startswith("longer than"):
            field_name = "data.filters.max_tokens" if d.filters.max_tokens is not None else "dpo.max_length"
        else:
            field_name = "data.filters"
        raise AlignpressError(
            f"no training rows left after filtering ({train_total['loaded']} loaded; {steps})",
            source=recipe.source,
            field=field_name,
        )
    if not evals and recipe.eval.enabled:
        # Found after training, this was an evaluation of nothing and a gate that could only fail.
        removed = "; ".join(f"{x['filter']}: -{x['removed']}" for x in eval_total["filters"] if x["removed"])
        split_fields = [_field(recipe, src.prefix, "eval_split") for src in sources if src.spec.eval_split]
        raise AlignpressError(
            f"no evaluation rows left ({eval_total['loaded']} loaded{'; ' + removed if removed else ''}): the evaluate stage "
            "would score nothing after training; hold out more rows, or set eval.enabled: false",
            source=recipe.source,
            field=split_fields[0] if split_fields else "data.eval_fraction",
        )

    per_source = []
    for k, src in enumerate(sources):
        entry = src.stats()
        entry["splits"] = {"train": train_reports[k].as_dict(sum(1 for j, _ in train if j == k)),
                           "eval": eval_reports[k].as_dict(sum(1 for j, _ in evals if j == k))}
        per_source.append(entry)
    train = [r for _, r in train]
    evals = [r for _, r in evals]

    tmp = run_dir.partial(run_dir.data)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "eval.jsonl", evals)
    fingerprint = hashlib.sha256((tmp / "train.jsonl").read_bytes() + b"\0" + (tmp / "eval.jsonl").read_bytes()).hexdigest()
    formats = list(dict.fromkeys(src.fmt for src in sources))
    stats = {
        "dataset": sources[0].spec.dataset if len(sources) == 1 else [src.spec.dataset for src in sources],
        "format": ", ".join(formats),
        "format_source": sources[0].how if len(sources) == 1 else "per source",
        "splits": {"train": train_total, "eval": eval_total},
        "sources": per_source,
        "tokens": {"train": _token_stats(train), "eval": _token_stats(evals)},
        "fingerprint": fingerprint,
    }
    write_json(tmp / "stats.json", stats)
    run_dir.commit(tmp, run_dir.data)

    for split, report in (("train", train_total), ("eval", eval_total)):
        for x in report["filters"]:
            if x["removed"]:
                # the rating filters are named by what they keep (`rating_chosen >= 4.5`), the others by what they drop
                keep_rule = re.fullmatch(r"\S+ (>=|<=) \S+", x["filter"])
                log.info("  %s: removed %d (%s%s)", split, x["removed"], "failing " if keep_rule else "", x["filter"])
    if len(sources) > 1:
        for entry in per_source:
            log.info("  %s (%s): %d training, %d eval pairs", entry["field"], entry["dataset"], entry["splits"]["train"]["kept"], entry["splits"]["eval"]["kept"])
    log.info("data: %d training pairs, %d eval pairs written to %s", len(train), len(evals), run_dir.data)
    print(show_pair(tok, train[0]), flush=True)
    return {"format": stats["format"], "train_pairs": len(train), "eval_pairs": len(evals), "fingerprint": fingerprint}
