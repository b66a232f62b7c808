"""The launch's Hub checks, made by sky/setup.sh before it builds the job's environment (minutes of
a rented GPU, again after each spot recovery): HUB_REPO is a repo id, and HF_TOKEN is a token the
Hub accepts that may write to HUB_REPO's namespace. Standard library only (any python3 >= 3.8 on
the VM; the job's own packages are not installed yet). `--offline` (sky/run.sh): the first two
checks only, the job's preflight asks the Hub itself.

One line on stderr and exit 2 for what the user must fix. When the Hub cannot be asked (no network,
a 5xx), nothing is said and the launch goes on: the job's preflight asks again before prepare.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from alignpress.errors import holds_token  # noqa: E402
from alignpress.hubnames import check_repo_id, token_problem, write_problem  # noqa: E402


def refuse(text: str) -> None:
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    repo, token = os.environ["HUB_REPO"], os.environ["HF_TOKEN"].strip()
    if holds_token(repo):  # the token pasted as HUB_REPO: the line below would have quoted it into the VM's log
        refuse("HUB_REPO holds a Hub token (not shown); launch with --env HUB_REPO=namespace/name and the token only in --secret HF_TOKEN")
    if problem := check_repo_id(repo):
        refuse(f"HUB_REPO: {repo!r}: {problem}; launch with --env HUB_REPO=namespace/name")
    if problem := token_problem(token):
        refuse(f"HF_TOKEN {problem}: launch with --secret HF_TOKEN set to the token from https://huggingface.co/settings/tokens")
    if "--offline" in sys.argv[1:]:
        return
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            me = json.load(answer)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            refuse(f"HF_TOKEN: the Hub rejects this token (HTTP 401 from {endpoint}); launch with --secret HF_TOKEN set to a valid token")
        return  # the Hub's trouble, not the launch's: the job's preflight asks again
    except (OSError, ValueError):
        return  # no network here, or not an answer: the same
    if problem := write_problem(me, [repo]):
        kind, text = problem
        refuse(f"HF_TOKEN: {text}" if kind == "token" else f"HUB_REPO: {text}; launch with another HUB_REPO or another token")


if __name__ == "__main__":
    main()
