"""Preference-data layouts, and their normalisation to one shape.

Every row becomes conversational messages: `prompt` (all messages before the answer),
`chosen` and `rejected` (one assistant message each). That is TRL's explicit-prompt
conversational format, so the model's own chat template does all formatting.

Layouts (name: columns):
- capybara: prompt (str) + chosen/rejected as whole conversations (message lists); also UltraFeedback.
- conversational: prompt, chosen, rejected as message lists (TRL).
- standard: prompt, chosen, rejected as strings (TRL).
- implicit: chosen/rejected only, message lists (the shared leading messages are the prompt) or strings
  (the shared leading text is the prompt).
- hh: chosen/rejected transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic HH).
- system_question: system, question, chosen, rejected strings (Intel orca_dpo_pairs).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from .errors import AlignpressError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

REQUIRED_COLUMNS = {
    "capybara": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "standard": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "system_question": ("question", "chosen", "rejected"),
}


# Every column a layout reads (the required ones, plus system_question's optional system prompt).
LAYOUT_COLUMNS = {**REQUIRED_COLUMNS, "system_question": ("system", "question", "chosen", "rejected")}

# Format detection classifies this many leading rows by their value types; rows that disagree
# with the majority are reported (and then checked as rows of the majority's format).
DETECT_ROWS = 1000


class RowError(ValueError):
    """One row cannot be normalised; the message says why."""


def _looks_hh(text: Any) -> bool:
    return isinstance(text, str) and "\n\nHuman:" in text and "\n\nAssistant:" in text


def written_messages(value: Any) -> bool:
    """Whether text is a list of {role, content} messages written out (a CSV keeps no lists: pandas
    writes Python's repr, other tools JSON), which the string layouts would train on as it stands."""
    if not isinstance(value, str) or not value.lstrip().startswith("[{") or "role" not in value:
        return False
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return isinstance(parsed, list) and bool(parsed) and all(isinstance(m, dict) and "role" in m for m in parsed)
    return False


WRITTEN_MESSAGES = ("holds a list of {role, content} messages written as text (a CSV keeps no lists); read the data from "
                    "JSON lines or parquet, where lists stay lists")


def describe_value(value: Any) -> str:
    """A short phrase for a value's type, for error messages: 'an integer (5)', 'a list of str'."""
    if value is None:
        # A table read from JSON lines fills a key a row lacks with null: the two look the same here.
        return "missing (or null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        return f"text ({value[:40]!r})"
    if isinstance(value, dict):
        return "a mapping (" + ", ".join(sorted(map(str, value))[:5]) + ")"
    if isinstance(value, list):
        if not value:
            return "an empty list"
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {'/'.join(kinds)}"
    return type(value).__name__


def _kind(value: Any) -> str | None:
    """'text', 'messages' (a non-empty list of mappings: the normaliser checks each message), or None."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return "messages"
    return None


def _one_answer(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant"


def classify_row(columns: set[str], row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(layout, None) for a row whose value types fit a layout, else (None, the column that fits none)."""
    if {"question", "chosen", "rejected"} <= columns:
        for c in ("question", "chosen", "rejected"):
            if _kind(row[c]) is None or (c == "question" and _kind(row[c]) != "text"):
                return None, c
        return "system_question", None
    if {"prompt", "chosen", "rejected"} <= columns:
        p, c, r = (_kind(row[k]) for k in ("prompt", "chosen", "rejected"))
        if p is None:
            return None, "prompt"
        if c is None:
            return None, "chosen"
        if r is None:
            return None, "rejected"
        if p == "messages":
            return "conversational", None
        # Whole conversations (capybara) hold the prompt's turns; one assistant message each is an answer
        # to the prompt column's text (standard), and as a conversation it had no prompt at all.
        if c == "messages" and not (_one_answer(row["chosen"]) and _one_answer(row["rejected"])):
            return "capybara", None
        return "standard", None
    if {"chosen", "rejected"} <= columns:
        for c in ("chosen", "rejected"):
            if _kind(row[c]) is None:
                return None, c
        return ("hh" if _looks_hh(row["chosen"]) else "implicit"), None
    raise ValueError("classify_row needs chosen and rejected columns")


def _not_pairs(columns: set[str]) -> str | None:
    """A known layout that is not paired preferences (so cannot be mixed into DPO pairs), or None."""
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired preference data (prompt, completion, label: TRL's KTO layout)"
    if "messages" in columns or "conversations" in columns:
        return "conversations for supervised fine-tuning (a messages column)"
    if {"prompt", "completion"} <= columns or "text" in columns:
        return "supervised fine-tuning data (prompt/completion or text)"
    return None


def detect_format(columns: list[str], rows: dict[str, Any] | list[dict[str, Any]], source: str | None = None,
                  prefix: str | None = None) -> tuple[str, dict[str, list[int]]]:
    """Pick the layout from the column names and the value types of the given leading rows.

    Returns the majority layout and, for every layout seen, the row indices that had it.
    `source` (the data file or dataset) goes into the errors; `prefix` (`data`, `data.datasets[1]`)
    is the recipe section of that source, whose columns and format fields the hint names.
    """
    cols = set(columns)
    rows = [rows] if isinstance(rows, dict) else rows
    if not {"chosen", "rejected"} <= cols:
        what = _not_pairs(cols)
        if what:
            raise AlignpressError(
                f"the columns {sorted(cols)} hold {what}, not preference pairs; DPO needs a chosen and a rejected answer in every row, "
                "so this cannot be used or mixed with pairs",
                source=source,
            )
        missing = ", ".join(c for c in ("chosen", "rejected") if c not in cols)
        raise AlignpressError(
            f"cannot tell the preference format from the columns {sorted(cols)}: missing {missing}. Every layout needs chosen "
            f"and rejected (plus prompt, or question); rename them with a column mapping ({prefix or 'data.datasets[]'}.columns) "
            f"or set {prefix or 'data'}.format to one of: " + ", ".join(REQUIRED_COLUMNS),
            source=source,
        )
    for i, row in enumerate(rows):
        if written := next((c for c in ("prompt", "question", "chosen", "rejected") if c in cols and written_messages(row[c])), None):
            raise AlignpressError(f"row {i}, column {written!r} {WRITTEN_MESSAGES}: {row[written][:40]!r}", source=source)
    seen: dict[str, list[int]] = {}
    first_bad: tuple[int, str] | None = None
    for i, row in enumerate(rows):
        fmt, bad = classify_row(cols, row)
        if fmt:
            seen.setdefault(fmt, []).append(i)
        elif first_bad is None:
            first_bad = (i, bad)
    if not seen:
        i, col = first_bad if first_bad else (0, "chosen")
        value = rows[i][col] if rows else None
        wanted = "text" if col == "question" else "text or a list of {role, content} messages"
        raise AlignpressError(
            f"row {i}, column {col!r}: {describe_value(value)}; a preference layout needs {wanted} there "
            f"(checked {len(rows)} row{'s' if len(rows) != 1 else ''}, none fits a layout)",
            source=source,
        )
    fmt = max(seen, key=lambda f: len(seen[f]))
    return fmt, seen


def check_columns(fmt: str, columns: list[str], source: str, field: str = "data.format", data: str | None = None) -> None:
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        where = f" in {data}" if data else ""
        raise AlignpressError(
            f"format {fmt!r} needs columns {', '.join(REQUIRED_COLUMNS[fmt])}; missing {', '.join(missing)}{where} "
            f"(the data has: {', '.join(sorted(columns))})",
            source=source,
            field=field,
        )


def _messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{what} is {describe_value(value)}, not a list of {{role, content}} messages")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise RowError(f"{what} has a message that is {describe_value(m)}, not a {{role, content}} mapping")
        for key in ("role", "content"):
            if key not in m:
                raise RowError(f"{what} has a message without {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowError(f"{what} has a message with role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{what} has a message whose content is {describe_value(content)}, not text")
        out.append({"role": role, "content": content})
    return out


def _answer(value: Any, what: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise RowError(f"{what} is {describe_value(value)}, not text or a list of {{role, content}} messages")
    msgs = _messages(value, what)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError(f"{what} must be exactly one assistant message")
    return msgs


def _split_conversation(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], Message, Message]:
    """Whole conversations that differ in the last assistant message -> (prompt, chosen, rejected)."""
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("the last message of chosen and rejected must be the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("chosen and rejected conversations differ before the last answer")
    if not chosen[:-1]:
        raise RowError("the conversation has no prompt before the answer")
    return chosen[:-1], chosen[-1], rejected[-1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[Message]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("HH transcript has text before the first 'Human:' turn")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not msgs:
        raise RowError("HH transcript has no turns")
    return msgs


def common_prefix(a, b) -> int:
    """Length of the shared beginning of two sequences (strings or token-id lists)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def normalise_row(fmt: str, row: dict[str, Any]) -> dict[str, list[Message]]:
    """One raw row -> {prompt, chosen, rejected} as messages. Raises RowError when the row is malformed."""
    if written := next((c for c in ("prompt", "question", "chosen", "rejected") if written_messages(row.get(c))), None):
        raise RowError(f"{written} {WRITTEN_MESSAGES}")
    if fmt == "capybara":
        if _one_answer(row["chosen"]) and _one_answer(row["rejected"]):
            raise RowError("chosen and rejected are one assistant message each, with no prompt before them: "
                           "with the prompt as text in the prompt column, that is format standard")
        prompt, chosen, rejected = _split_conversation(_messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected"))
        return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    if fmt == "conversational":
        prompt = _messages(row["prompt"], "prompt")
        return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}
    if fmt == "standard":
        if not isinstance(row["prompt"], str):
            raise RowError("prompt is not a string")
        prompt = [{"role": "user", "content": row["prompt"]}]
        return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}
    if fmt == "implicit":
        c, r = row["chosen"], row["rejected"]
        if isinstance(c, str) and isinstance(r, str):
            n = common_prefix(c, r)
            # Back to a word boundary: answers that begin alike ("The answer is 4." / "That is hard") share
            # letters that belong to the answers, not to the prompt
            while n > 0 and not c[n - 1].isspace():
                n -= 1
            if n == 0:
                raise RowError("implicit-prompt strings share no prefix to use as the prompt")
            return {
                "prompt": [{"role": "user", "content": c[:n]}],
                "chosen": [{"role": "assistant", "content": c[n:]}],
                "rejected": [{"role": "assistant", "content": r[n:]}],
            }
        prompt, chosen, rejected = _split_conversation(_messages(c, "chosen"), _messages(r, "rejected"))
        return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    if fmt == "hh":
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise RowError("HH chosen/rejected must be transcript strings")
        prompt, chosen, rejected = _split_conversation(parse_hh(row["chosen"]), parse_hh(row["rejected"]))
        return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    if fmt == "system_question":
        prompt = []
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            prompt.append({"role": "system", "content": system})
        if not isinstance(row["question"], str):
            raise RowError("question is not a string")
        prompt.append({"role": "user", "content": row["question"]})
        return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}
    raise AlignpressError(f"unknown format {fmt!r}", field="data.format")
