"""Stage 5, publish: push the exported model to the Hugging Face Hub.

Without publish.repo_id or a token the stage skips the push and says where the finished
folder is; that is not an error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .recipe import Recipe
from .runstate import RunDir

log = logging.getLogger("alignpress")


def find_token() -> str | None:
    """HF_TOKEN, else the user's stored login. Never read from the recipe."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    if not recipe.publish.repo_id:
        msg = f"no publish.repo_id: skipped the push; the finished model is in {run_dir.model}"
        print(msg, flush=True)
        return {"pushed": False, "reason": "no publish.repo_id"}
    if not find_token():
        msg = f"no Hub token (HF_TOKEN or `hf auth login`): skipped the push; the finished model is in {run_dir.model}"
        print(msg, flush=True)
        return {"pushed": False, "reason": "no token"}
    raise NotImplementedError("pushing to the Hub is not built yet")
