"""The Hub's rules for repo ids and what a token may write: standard library only, so that
sky/launch_check.py can ask them on a rented VM before the job's environment is built."""

from __future__ import annotations

import re
from typing import Any

REPO_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# A character no Hub token has: an HTTP header cannot carry whitespace inside or non-ASCII.
NOT_IN_A_TOKEN = re.compile(r"[^\x21-\x7e]")


def check_repo_id(repo_id: str) -> str | None:
    """The Hub's rules for namespace/name; returns what is wrong, or None."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return "expected namespace/name (exactly one '/')"
    for part in parts:
        if not REPO_PART.match(part):
            return (f"'{part}' is not a valid Hub name: use letters, digits, '-', '_', '.', at most 96 characters, "
                    "no '--' or '..', not starting or ending with '-' or '.'")
    if parts[1].endswith(".git"):
        return "a repo name cannot end with .git"
    return None


def token_problem(token: str) -> str | None:
    """Why `token` cannot be a Hub token (never quoting it), or None."""
    if bad := NOT_IN_A_TOKEN.search(token):
        kind = "whitespace" if bad.group().isspace() else "a non-ASCII character"
        return f"holds {kind} at position {bad.start() + 1}, which no Hub token has"
    return None


def write_problem(me: dict[str, Any], repo_ids: list[str]) -> tuple[str, str] | None:
    """From the Hub's whoami answer: ("token" or "namespace", why) when the token cannot push to
    every repo in `repo_ids`, or None."""
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return "token", f"the token of '{me['name']}' is read-only: create a token with write access (https://huggingface.co/settings/tokens)"
    writable = {me["name"]} | {o["name"] for o in me.get("orgs", []) if o.get("roleInOrg") in ("admin", "write", "contributor")}
    for ns in sorted({r.split("/")[0] for r in repo_ids}):
        if ns not in writable:
            return "namespace", f"the token belongs to '{me['name']}', who cannot write to the namespace '{ns}' (writable: {', '.join(sorted(writable))})"
    fine = ((me.get("auth") or {}).get("accessToken") or {}).get("fineGrained")
    if role == "fineGrained" and isinstance(fine, dict) and isinstance(fine.get("scoped"), list):
        # A fine-grained token writes where one of its scopes grants repo.write: its user or an org
        # (new repos too), or one repo
        granted = {(str((s.get("entity") or {}).get("type")), str((s.get("entity") or {}).get("name")))
                   for s in fine["scoped"] if isinstance(s, dict) and "repo.write" in (s.get("permissions") or [])}
        for repo in repo_ids:
            ns = repo.split("/")[0]
            if not ({("user", ns), ("org", ns), ("model", repo)} & granted):
                return "token", (f"the fine-grained token of '{me['name']}' may not write to {repo}: give it \"Write access to contents/settings of "
                                 f"all repos\" under '{ns}' (repo.write), or create a token with write access (https://huggingface.co/settings/tokens)")
    return None
