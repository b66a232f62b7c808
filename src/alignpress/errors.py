"""One error type for everything a user can fix: it names where the problem is (file and field)."""

import re

# What `redact` hides in an error before it is printed or stored: Hugging Face tokens (also when a
# library quotes one with an escaped newline, so the exact token no longer matches) and the password
# of a URL (https://user:password@host).
_SECRETS = [(re.compile(r"(hf_|api_org_)[A-Za-z0-9]{20,}"), "<token>"),
            (re.compile(r"(?<=://)([^/\s:@]+):[^/\s@]+@"), r"\1:<password>@")]


def holds_token(text: str) -> bool:
    """Whether `text` holds a Hugging Face token: one by its form, or this environment's own
    HF_TOKEN (whatever its form, e.g. a test server's)."""
    import os

    if _SECRETS[0][0].search(text):
        return True
    return any(len(tok) >= 8 and tok in text for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if (tok := os.environ.get(name, "").strip()))


def redact(text: str) -> str:
    """`text` without the secrets an error message may quote (tokens never reach a log or a file)."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for quoting inside one of ours: without its closing
    period (ours follows: "...cached files. Check the Hub id", not "files.. Check"); "" when empty."""
    text = str(e).strip()
    line = text.splitlines()[0].rstrip() if text else ""
    return line[:-1] if line.endswith(".") and not line.endswith("..") else line


class AlignpressError(Exception):
    """A problem with the user's input or environment, reported as one clear line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ""
        if source and field:
            where = f"{source}: field '{field}': "
        elif source:
            where = f"{source}: "
        elif field:
            where = f"field '{field}': "
        super().__init__(where + message)


class StageFailed(AlignpressError):
    """A stage ran but its result failed a check (for example a merge that changed nothing)."""

    exit_code = 3


class Preempted(AlignpressError):
    """SIGTERM (a spot preemption notice), SIGHUP or Ctrl-C stopped training after saving a checkpoint."""

    exit_code = 143


class OutOfGpuMemory(AlignpressError):
    """A stage ran out of GPU memory: a failure while running (exit 1), with the setting that fixes it."""

    exit_code = 1


def cuda_oom_numbers(text: str) -> str:
    """'1.95 GiB more asked, 1.06 GiB of 39.38 GiB free' from the message of CUDA's allocator; '' without them."""
    asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    room = re.search(r"total capacity of ([\d.]+ \w+) of which ([\d.]+ \w+) is free", text)
    return ", ".join(part for part in (f"{asked[1]} more asked" if asked else "", f"{room[2]} of {room[1]} free" if room else "") if part)
