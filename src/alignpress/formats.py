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


class RowError(ValueError):
    """One row cannot be normalised; the message says why."""


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _looks_hh(text: Any) -> bool:
    return isinstance(text, str) and "\n\nHuman:" in text and "\n\nAssistant:" in text


def detect_format(columns: list[str], first_row: dict[str, Any]) -> str:
    """Pick the layout from the column names and the types in the first row."""
    cols = set(columns)
    if {"question", "chosen", "rejected"} <= cols:
        return "system_question"
    if {"prompt", "chosen", "rejected"} <= cols:
        prompt, chosen = first_row["prompt"], first_row["chosen"]
        if _is_messages(prompt):
            return "conversational"
        if isinstance(prompt, str) and _is_messages(chosen):
            return "capybara"
        if isinstance(prompt, str) and isinstance(chosen, str):
            return "standard"
    elif {"chosen", "rejected"} <= cols:
        chosen = first_row["chosen"]
        if _looks_hh(chosen):
            return "hh"
        if _is_messages(chosen) or isinstance(chosen, str):
            return "implicit"
    raise AlignpressError(
        "cannot tell the preference format from the columns "
        f"{sorted(cols)}; expected prompt/chosen/rejected, chosen/rejected, or system/question/chosen/rejected. "
        "Set data.format to one of: " + ", ".join(REQUIRED_COLUMNS),
        field="data.format",
    )


def check_columns(fmt: str, columns: list[str], source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        raise AlignpressError(
            f"format {fmt!r} needs columns {', '.join(REQUIRED_COLUMNS[fmt])}; missing {', '.join(missing)} "
            f"(the data has: {', '.join(sorted(columns))})",
            source=source,
            field="data.format",
        )


def _messages(value: Any, what: str) -> list[Message]:
    if not _is_messages(value):
        raise RowError(f"{what} is not a list of {{role, content}} messages")
    out = []
    for m in value:
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowError(f"{what} has a message with role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{what} has a message whose content is not text")
        out.append({"role": role, "content": content})
    return out


def _answer(value: Any, what: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
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
    if fmt == "capybara":
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
