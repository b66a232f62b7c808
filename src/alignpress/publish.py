"""Stage 5, publish: push the exported model (and/or the LoRA adapter) to the Hugging Face Hub.

Reads: model/ (export), adapter/ (train), run.json, data/stats.json and metrics/ (for the card).
Writes: nothing in the output folder; run.json's publish entry records what was pushed (repo
url, branch, tag, commit, files with sizes). The token is never written anywhere.

Without publish.repo_id the stage says it skipped the push and where the finished folder is; that
is not an error. With publish.repo_id but no token (HF_TOKEN or `hf auth login`) it is an error
(exit 2): the user asked for a push that cannot happen. `run` finds that out first: preflight()
makes checks 2 and 3 below (token present and valid, namespace writable, an existing repo
compatible), and asks the Hub whether it accepts the card's metadata block (license, language,
base model: known before training), before prepare, so a run that could not publish never spends
GPU time.

What is uploaded: an allow-list of top-level files, nothing else (no subfolders, so never
checkpoints/; never *.bin, *.pt, *.pth, *.pkl, *.ckpt, training_args*, optimizer*, scheduler*,
rng_state*, trainer_state.json, even if a pattern below would match):
- model (publish.push model or both), to the main branch of publish.repo_id: from model/,
  *.safetensors, *.safetensors.index.json, config.json, generation_config.json, the tokenizer
  files (tokenizer.json, tokenizer_config.json, tokenizer.model, special_tokens_map.json,
  added_tokens.json, vocab.json, merges.txt, chat_template.jinja, chat_template.json), *.png;
- adapter (publish.push adapter or both): from adapter/, adapter_config.json,
  adapter_model.safetensors and the tokenizer files. It goes to the main branch of
  publish.adapter_repo_id; without one, to the `adapter` branch of repo_id (push: both; the branch
  starts from the repo's first commit, so it holds only the adapter) or to repo_id's main
  (push: adapter);
- generated for each push: README.md, the model card rendered for that repo (the exported
  card's metadata; for the adapter library_name: peft and, with a Hub base model,
  base_model_relation: adapter), and alignpress.json (recipe name and run id: the marker that
  says this run published the repo).
For the demo that is README.md, alignpress.json, chat_template.jinja, config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json.

Order of work; every refusal happens before anything is uploaded:
0. the publish gate (gate.check: eval.gate_min_gain / eval.gate_max_kl);
1. collect the files and scan each one fully for secrets (Hugging Face, AWS, GitHub, Slack and
   OpenAI-style keys, private key blocks, the current token itself, and in text files and
   safetensors headers `password: ...`-style assignments); a hit refuses the push naming the
   file and the kind of secret, never the secret; no request has been sent at that point;
2. whoami: the token is valid and may write to the namespace;
3. an existing repo: public while publish.private is true -> refused; not this run's (see
   below) and publish.allow_update false -> refused; the tag already names a commit with
   other model files -> refused (when only README.md differs, e.g. other publish settings in
   the card's recipe, the tag moves to the new commit);
4. one commit per destination (create_commit with explicit operations, parent_commit = the
   head it was planned against): files whose sha256 (LFS) or git blob id (regular) equal the
   remote's are left out, allow-listed remote files the folder no longer has are deleted; no
   change -> no commit (a re-run of a finished push makes none). Then the tag (default: the
   run id; `<tag>-adapter` for the adapter branch);
5. verify: the tagged commit's file list against the uploaded files (names, sizes, sha256 or
   git blob id), the README downloaded back and parsed as a model card, the private flag.

"This run's repo": its alignpress.json names this run id, or it holds nothing but
.gitattributes (what a first push interrupted before its commit leaves; pushing there
overwrites nothing). A re-run of an interrupted or finished push therefore needs no
allow_update.

Failures: huggingface_hub retries 429/5xx on its upload routes; this stage retries a whole
destination push (replanned against the remote, so a commit whose answer was lost is not made
twice) after RETRY_WAITS seconds, then raises one line: AlignpressError (exit 2) for what the
user must fix (token, permissions, visibility, secrets, an existing repo), StageFailed (exit 3)
for a Hub or network failure or a failed verification. The stage is then marked failed, so
`run` runs it again, and re-running `publish` completes the push.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import card, gate
from .errors import AlignpressError, StageFailed, redact
from .hubnames import token_problem, write_problem
from .recipe import Recipe
from .runstate import RunDir, owned_run_ids

log = logging.getLogger("alignpress")

T = TypeVar("T")

MARKER = "alignpress.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", *TOKENIZER_FILES, "*.png")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES)
NEVER = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "training_args*", "optimizer*", "scheduler*", "rng_state*", "trainer_state.json")
# Remote files this stage owns: deleted from the pushed revision when the folder no longer has them.
MANAGED = (*MODEL_FILES, *ADAPTER_FILES, "README.md", MARKER)
CARD_FILES = ("README.md", MARKER)  # generated at publish time; the rest is the model itself

RETRY_WAITS: tuple[float, ...] = (2.0, 5.0)  # seconds between attempts of one destination push
# 412: the branch moved between planning and committing; the next attempt plans again.
RETRY_STATUSES = frozenset({408, 412, 429, 500, 502, 503, 504})
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files this large through LFS whatever their name
TEXT_SCAN_LIMIT = 64 * 1024 * 1024  # files up to this size are scanned in one piece
NEWLINE = b"\n"

# Secrets recognised anywhere in a file, binary or text: (kind, pattern).
SECRET_PATTERNS = [
    ("Hugging Face token", re.compile(rb"hf_[A-Za-z0-9]{30,}")),
    ("Hugging Face org API token", re.compile(rb"api_org_[A-Za-z0-9]{30,}")),
    ("AWS access key id", re.compile(rb"(?:AKIA|ASIA)[0-9A-Z]{16}")),
    ("private key block", re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY[A-Z ]*-----")),
    ("GitHub token", re.compile(rb"gh[pousr]_[A-Za-z0-9]{36,}")),
    ("Slack token", re.compile(rb"xox[abprs]-[A-Za-z0-9-]{10,}")),
    ("OpenAI-style API key", re.compile(rb"sk-(?:proj-)?[A-Za-z0-9_-]{32,}")),
    ("password in a URL", re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@\"'<>]+:[^/\s@\"'<>]+@[A-Za-z0-9.-]")),
]
# Assignments such as `"api_key": "..."` or `password = ...`, in text (files and safetensors headers).
ASSIGNMENT = re.compile(
    rb"""(?i)(?<![A-Za-z0-9])["']?(api[_-]?key|access[_-]?key|secret[_-]?key|client[_-]?secret|secret|password|passwd"""
    rb"""|auth[_-]?token|access[_-]?token|hub[_-]?token|hf[_-]?token|token)["']?\s*[:=]\s*["']?([A-Za-z0-9+/=_.\-]{16,})"""
)


def find_token() -> str | None:
    """HF_TOKEN, else the user's stored login. Never read from the recipe."""
    from huggingface_hub import get_token

    # Stripped as huggingface_hub strips it: a token pasted with its newline used to fail every
    # request with an error that quoted it ("Illegal header value b'Bearer hf_...\\n'").
    return (os.environ.get("HF_TOKEN") or "").strip() or get_token()


# ---------------------------------------------------------------------------------------------
# What to push


@dataclass
class Upload:
    """One file of a push: from the output folder (`source`) or generated (`data`)."""

    path: str  # path in the repo
    size: int
    sha256: str
    git_oid: str | None  # git blob id; None for files the Hub always stores through LFS
    source: Path | None = None
    data: bytes | None = None

    @property
    def shown(self) -> str:
        return str(self.source) if self.source else f"<generated {self.path}>"

    def operation(self):
        from huggingface_hub import CommitOperationAdd

        return CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=str(self.source) if self.source else self.data)


@dataclass
class Destination:
    """One commit: a set of files for a branch of a repo, and the tag to put on it."""

    kind: str  # "model" | "adapter"
    repo_id: str
    branch: str
    tag: str
    message: str
    description: str
    files: dict[str, Upload] = field(default_factory=dict)
    card_library: str = "transformers"


def _allowed(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns) and not any(fnmatch.fnmatchcase(name, p) for p in NEVER)


def collect(folder: Path, patterns: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """Top-level files of `folder` on the allow-list, and the names left out."""
    if not folder.is_dir():
        raise AlignpressError(f"nothing to push: {folder} does not exist (run the earlier stages first)", source=str(folder))
    keep, left = [], []
    for p in sorted(folder.iterdir()):
        if p.name == "README.md":  # the card is rendered again for the repo it goes to
            continue
        if p.is_file() and _allowed(p.name, patterns):
            keep.append(p)
        else:
            left.append(p.name + ("/" if p.is_dir() else ""))
    return keep, left


def targets(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(kind, repo_id, branch) of each destination publish.push names."""
    p = recipe.publish
    out = []
    if p.push in ("model", "both"):
        out.append(("model", p.repo_id, "main"))
    if p.push in ("adapter", "both"):
        separate = p.adapter_repo_id not in (None, p.repo_id)
        out.append(("adapter", p.adapter_repo_id if separate else p.repo_id, "adapter" if p.push == "both" and not separate else "main"))
    return out


def plan(recipe: Recipe, run_dir: RunDir, token: str) -> list[Destination]:
    """The destinations of this push with their files, hashed and scanned for secrets."""
    p = recipe.publish
    manifest = run_dir.load()
    run_id = manifest["run_id"]
    tag = p.tag or run_id
    marker = json.dumps({"generator": "alignpress", "recipe": recipe.name, "run_id": run_id}, indent=2).encode() + b"\n"
    exported = _exported_card_data(recipe, run_dir)
    dests = []
    for kind, repo, branch in targets(recipe):
        if kind == "model":
            d = Destination("model", repo, "main", tag, p.commit_message or f"alignpress {recipe.name}: model from run {run_id}", "")
            text = card.render_model_card(recipe, run_dir, "finetune", data=exported, repo_id=d.repo_id)
            dests.append(_fill(d, run_dir.model, MODEL_FILES, text, marker, manifest))
            continue
        message = f"{p.commit_message} (adapter)" if p.commit_message else f"alignpress {recipe.name}: adapter from run {run_id}"
        d = Destination("adapter", repo, branch, tag if branch == "main" else f"{tag}-adapter", message, "", card_library="peft")
        text = card.render_model_card(recipe, run_dir, "adapter", data=adapter_card_data(exported), repo_id=repo, revision=branch)
        base_id = recipe.model.name_or_path if card.is_hub_id(recipe.model.name_or_path, recipe) else None
        dests.append(_fill(d, run_dir.adapter, ADAPTER_FILES, text, marker, manifest, base_id))
    findings = [f for d in dests for u in d.files.values() if (f := scan(u, token))]
    if findings:
        raise AlignpressError(
            "refusing to push: " + "; ".join(findings) + ". Nothing was uploaded; remove the secret from the file "
            "(and revoke it if it is real), then run publish again",
            source=str(run_dir.root),
        )
    return dests


def _fill(d: Destination, folder: Path, patterns: tuple[str, ...], card_text: str, marker: bytes, manifest: dict, base_id: str | None = None) -> Destination:
    """Hash the folder's allow-listed files and the generated ones into `d`."""
    files, left = collect(folder, patterns)
    names = {f.name for f in files}
    needed = {"adapter_config.json", "adapter_model.safetensors"} if d.kind == "adapter" else {"config.json"}
    if not needed <= names or not any(n.endswith(".safetensors") for n in names):
        missing = ", ".join(sorted(needed - names)) or "safetensors weights"
        raise AlignpressError(f"nothing to push: no {missing} here (run the earlier stages again)", source=str(folder))
    for path in files:
        d.files[path.name] = _hashed(path.name, source=path)
    if d.kind == "adapter":
        # PEFT wrote the path the base loaded from: a folder on this machine (/home/NAME/...) is no
        # use elsewhere and says where the author keeps files. The Hub id when the base is on the Hub.
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("base_model_name_or_path") != base_id:
            config["base_model_name_or_path"] = base_id
            d.files["adapter_config.json"] = _hashed("adapter_config.json", data=(json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    d.files["README.md"] = _hashed("README.md", data=card_text.encode())
    d.files[MARKER] = _hashed(MARKER, data=marker)
    d.description = (
        f"Pushed by alignpress from recipe `{manifest.get('recipe')}` ({card.shown_recipe_file(manifest)}), run `{manifest['run_id']}`: "
        f"the {d.kind}, {len(d.files)} files."
    )
    if left:
        log.info("publish %s: left out (not on the allow-list): %s", d.kind, ", ".join(left))
    return d


def _exported_card_data(recipe: Recipe, run_dir: RunDir):
    """The metadata of the card export wrote, so publish never looks anything up again."""
    from huggingface_hub import ModelCard

    readme = run_dir.model / "README.md"
    if readme.exists():
        return ModelCard.load(readme).data
    return card.metadata(recipe)


def adapter_card_data(data):
    """Metadata for the adapter's card: the model card's, as a PEFT adapter of the base model."""
    from huggingface_hub import ModelCardData

    out = {k: v for k, v in data.to_dict().items() if v is not None}
    out["library_name"] = "peft"
    if out.get("base_model"):
        out["base_model_relation"] = "adapter"
    return ModelCardData(**out)


def _hashed(name: str, *, source: Path | None = None, data: bytes | None = None) -> Upload:
    sha = hashlib.sha256()
    size = source.stat().st_size if source else len(data or b"")
    git = hashlib.sha1(b"blob %d\0" % size) if size < LFS_THRESHOLD else None
    for chunk in _chunks(source, data):
        sha.update(chunk)
        if git:
            git.update(chunk)
    return Upload(name, size, sha.hexdigest(), git.hexdigest() if git else None, source, data)


def _chunks(source: Path | None, data: bytes | None, size: int = 8 << 20):
    if source is None:
        yield data or b""
        return
    with open(source, "rb") as f:
        while block := f.read(size):
            yield block


# ---------------------------------------------------------------------------------------------
# Secret scan


def scan(u: Upload, token: str | None) -> str | None:
    """What looks like a secret in an upload: 'FILE: KIND at line N' (never the secret), or None.

    Files up to TEXT_SCAN_LIMIT are scanned in one piece, text files (no NUL byte in their first
    8 KiB) for assignments too; larger ones are streamed for the token and the fixed patterns.
    A safetensors file's JSON header (its __metadata__ can hold any string) is scanned as text.
    """
    literal = token.encode() if token else None
    if u.path.endswith(".safetensors"):
        header = _safetensors_header(u)
        if header and (hit := _scan_blob(header, literal, assignments=True)):
            return f"{u.shown}: {hit[0]} in its safetensors header"
    if u.size <= TEXT_SCAN_LIMIT:
        blob = u.data if u.data is not None else u.source.read_bytes()  # type: ignore[union-attr]
        text = b"\0" not in blob[:8192]
        if hit := _scan_blob(blob, literal, assignments=text):
            where = f"at line {blob.count(NEWLINE, 0, hit[1]) + 1}" if text else f"at byte {hit[1]}"
            return f"{u.shown}: {hit[0]} {where}"
        return None
    # Large files: streamed, with an overlap so that a secret across two blocks is still seen.
    overlap, offset, tail = 4096, 0, b""
    for block in _chunks(u.source, None):
        if hit := _scan_blob(tail + block, literal, assignments=False):
            return f"{u.shown}: {hit[0]} at byte {offset - len(tail) + hit[1]}"
        offset += len(block)
        tail = block[-overlap:]
    return None


def _safetensors_header(u: Upload) -> bytes | None:
    """The JSON header of a safetensors file: 8 bytes little-endian length, then the JSON."""
    head = next(_chunks(u.source, u.data, size=8), b"")[:8]
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < n <= min(u.size - 8, 100 << 20):
        return None
    if u.data is not None:
        return u.data[8 : 8 + n]
    with open(u.source, "rb") as f:  # type: ignore[arg-type]
        f.seek(8)
        return f.read(n)


def _scan_blob(blob: bytes, literal: bytes | None, assignments: bool) -> tuple[str, int] | None:
    if literal and (pos := blob.find(literal)) >= 0:
        return "the Hub token in use", pos
    for kind, pattern in SECRET_PATTERNS:
        if m := pattern.search(blob):
            return kind, m.start()
    if assignments:
        for m in ASSIGNMENT.finditer(blob):
            value = m.group(2)
            # Random secrets mix letters and digits; identifiers such as tokenizer class names do not.
            if re.search(rb"[A-Za-z]", value) and re.search(rb"[0-9]", value):
                return f"'{m.group(1).decode()}' assignment", m.start()
    return None


# ---------------------------------------------------------------------------------------------
# Talking to the Hub


class Hub:
    """HfApi calls with this stage's retries and one-line errors that never hold the token."""

    def __init__(self, token: str, rerun: str):
        from huggingface_hub import HfApi

        # huggingface_hub fixes its default endpoint at import time: read HF_ENDPOINT now.
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token, library_name="alignpress")
        self.token = token
        self.rerun = rerun  # what to do after a failure, appended to its message
        self.tmp = tempfile.TemporaryDirectory(prefix="alignpress-publish-")

    def close(self) -> None:
        self.tmp.cleanup()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, again after each of RETRY_WAITS on a transient failure; `what` names it in errors."""
        waits = list(RETRY_WAITS)
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except AlignpressError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes one clear line below
                log.debug("publish: %s failed", what, exc_info=True)
                if waits and _transient(e):
                    wait = waits.pop(0)
                    log.warning("publish: %s failed (%s); retrying in %g s", what, self._describe(e), wait)
                    time.sleep(wait)
                    continue
                raise self._error(what, e, attempt) from None

    def _describe(self, e: Exception) -> str:
        status = _status(e)
        if status is not None:
            server = getattr(e, "server_message", None) or ""
            text = f"HTTP {status}" + (f": {server.strip().splitlines()[0]}" if server.strip() else "")
        else:
            refused = metadata_error(e) if isinstance(e, ValueError) else None
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            text = str(refused) if refused else f"{type(e).__name__}" + (f": {first}" if first else "")
        return self.scrub(text)[:400]

    def scrub(self, text: str) -> str:
        return redact(text.replace(self.token, "<token>") if self.token else text)

    def _error(self, what: str, e: Exception, attempts: int) -> AlignpressError:
        status, detail = _status(e), self._describe(e)
        if status == 401:
            return AlignpressError(f"the Hub rejected the token while {what} ({detail}): set HF_TOKEN to a valid token, or log in with `hf auth login`")
        if status == 403:
            return AlignpressError(f"the token may not do this while {what} ({detail}): use a token with write access to the namespace")
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return StageFailed(f"publish failed while {what}{tries}: {detail.rstrip('.')}. {self.rerun}")


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _transient(e: Exception) -> bool:
    import httpx2

    status = _status(e)
    if status is not None:
        return status in RETRY_STATUSES
    return isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError))


def check_identity(hub: Hub, repo_ids: list[str]) -> str:
    """whoami: the token is valid and may write to every namespace this push targets."""
    me = hub.call("checking the token (whoami)", hub.api.whoami)
    if problem := write_problem(me, repo_ids):
        kind, text = problem
        if kind == "token":
            raise AlignpressError(text)
        raise AlignpressError(f"{text}; fix publish.repo_id or use another token", field="publish.repo_id")
    return me["name"]


def tree(hub: Hub, repo_id: str, revision: str) -> dict[str, Any]:
    """{path: RepoFile} of every file at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    return {e.path: e for e in hub.api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(e, RepoFile)}


def same(u: Upload, remote) -> bool:
    if remote is None or remote.size != u.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == u.sha256
    return u.git_oid is not None and remote.blob_id == u.git_oid


def differences(d: Destination, remote: dict[str, Any]) -> tuple[list[Upload], list[str]]:
    """Files to upload and remote files to delete so the revision holds exactly this push."""
    changed = [u for u in d.files.values() if not same(u, remote.get(u.path))]
    stale = sorted(p for p in remote if p not in d.files and "/" not in p and _allowed_managed(p))
    return changed, stale


def _allowed_managed(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in MANAGED)


def _marker_run_id(hub: Hub, repo_id: str, revision: str, files: dict[str, Any]) -> str | None:
    if MARKER not in files:
        return None
    path = hub.api.hf_hub_download(repo_id, MARKER, revision=revision, cache_dir=hub.tmp.name)
    try:
        return json.loads(Path(path).read_text()).get("run_id")
    except (ValueError, AttributeError):
        return None


def check_repo(hub: Hub, recipe: Recipe, run_ids: list[str], repo_id: str, branches_used: list[str]) -> dict[str, str]:
    """Refuse an existing repo this push must not touch (visibility, ownership); returns its tags
    ({} when it does not exist). `run_ids`: the folder's run and its runs before each --restart
    (runstate.owned_run_ids); none (a run not started yet) owns only an empty repo."""
    from huggingface_hub.errors import RepositoryNotFoundError

    def info():
        try:
            return hub.api.repo_info(repo_id)
        except RepositoryNotFoundError:
            return None

    found = hub.call(f"looking up {repo_id}", info)
    if found is None:
        return {}
    p = recipe.publish
    if p.private and not found.private:
        raise AlignpressError(
            f"{repo_id} already exists and is public, but publish.private is true: refusing to push. Make it private on the Hub "
            "(repo Settings), or set publish.private: false to publish publicly",
            field="publish.private",
        )
    if found.private and not p.private:
        log.warning("publish: %s is private and stays private (publish.private false changes no existing repo)", repo_id)
    refs = hub.call(f"listing the branches and tags of {repo_id}", lambda: hub.api.list_repo_refs(repo_id))
    branches = {b.name: b.target_commit for b in refs.branches}
    tags = {t.name: t.target_commit for t in refs.tags}
    revisions = ["main", *[b for b in branches_used if b in branches and b != "main"]]
    ours, empty = False, True
    for rev in revisions:
        files = hub.call(f"listing the files of {repo_id}@{rev}", lambda rev=rev: tree(hub, repo_id, rev))
        empty = empty and set(files) <= {".gitattributes"}
        got = hub.call(f"reading {MARKER} of {repo_id}@{rev}", lambda rev=rev, files=files: _marker_run_id(hub, repo_id, rev, files))
        ours = ours or (got is not None and got in run_ids)
    if not (ours or empty or p.allow_update):
        raise AlignpressError(
            f"{repo_id} already exists and was not published by this run{f' (run {run_ids[0]})' if run_ids else ''}: refusing to push to it. "
            "Set publish.allow_update: true to add a commit to it, or choose another publish.repo_id",
            field="publish.allow_update",
        )
    return tags


def check_tags(hub: Hub, repo_id: str, tags: dict[str, str], dests: list[Destination]) -> None:
    """Refuse a tag that already names a commit of another model."""
    for d in dests:
        if d.tag in tags:
            remote = hub.call(f"listing the files of {repo_id}@{d.tag}", lambda d=d: tree(hub, repo_id, tags[d.tag]))
            changed, stale = differences(d, remote)
            # A new card alone (e.g. other publish settings in its recipe) is the same model: the tag moves.
            other = [u.path for u in changed if u.path not in CARD_FILES] + [p for p in stale if p not in CARD_FILES]
            if other:
                raise AlignpressError(
                    f"the tag '{d.tag}' of {repo_id} already names a commit with other files ({', '.join(other)}): "
                    "set publish.tag to a new name",
                    field="publish.tag",
                )


def push(hub: Hub, d: Destination, private: bool) -> dict[str, Any]:
    """One commit (or none when the remote already holds these files) and its tag."""
    from huggingface_hub import CommitOperationDelete

    api, repo = hub.api, d.repo_id
    hub.call(f"creating {repo}", lambda: _ensure_repo(hub, repo, private))
    refs = hub.call(f"listing the branches and tags of {repo}", lambda: api.list_repo_refs(repo))
    # What the branch and the tag named before: a commit that is neither was made by this push.
    before = ({b.name: b.target_commit for b in refs.branches}.get(d.branch), {t.name: t.target_commit for t in refs.tags}.get(d.tag))

    def attempt() -> str:
        refs = api.list_repo_refs(repo)
        branches = {b.name: b.target_commit for b in refs.branches}
        tags = {t.name: t.target_commit for t in refs.tags}
        if d.tag in tags and differences(d, tree(hub, repo, tags[d.tag])) == ([], []):
            return tags[d.tag]  # this exact push is already tagged: nothing to do
        if d.branch not in branches:  # the adapter branch starts empty: from the repo's first commit
            first = api.list_repo_commits(repo, revision="main")[-1].commit_id
            api.create_branch(repo, branch=d.branch, revision=first, exist_ok=True)
            branches[d.branch] = first
        head = branches[d.branch]
        changed, stale = differences(d, tree(hub, repo, head))
        commit = head
        if changed or stale:
            log.info("publish %s: committing %d file(s)%s to %s@%s", d.kind, len(changed), f", deleting {', '.join(stale)}" if stale else "", repo, d.branch)
            ops = [u.operation() for u in changed] + [CommitOperationDelete(path_in_repo=p) for p in stale]
            info = api.create_commit(repo, ops, commit_message=d.message, commit_description=d.description, revision=d.branch, parent_commit=head)
            commit = info.oid
        _tag(hub, d, commit, tags.get(d.tag))
        return commit

    commit = hub.call(f"pushing the {d.kind} to {repo}@{d.branch}", attempt)
    return {"commit": commit, "new_commit": commit not in before}


def _ensure_repo(hub: Hub, repo_id: str, private: bool) -> None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        hub.api.repo_info(repo_id)
        return
    except RepositoryNotFoundError:
        pass
    try:
        hub.api.create_repo(repo_id, private=private)
        log.info("publish: created %s repo %s", "private" if private else "public", repo_id)
    except HfHubHTTPError as e:
        if _status(e) != 409:
            raise
        # 409: it exists after all. If this token can see it now, the checks above must run again.
        try:
            hub.api.repo_info(repo_id)
        except RepositoryNotFoundError:
            raise StageFailed(
                f"the Hub answered 409 Conflict creating {repo_id}, yet the repo is not visible to this token "
                f"(another account's private repo, or one being created right now). {hub.rerun}"
            ) from None
        raise StageFailed(f"{repo_id} appeared while this push was starting (409 Conflict on create). {hub.rerun}") from None


def _tag(hub: Hub, d: Destination, commit: str, existing: str | None) -> None:
    """Tag `commit`; a tag on an older commit of the same model (check_repo: only the card differs) moves."""
    from huggingface_hub.errors import HfHubHTTPError

    if existing == commit:
        return
    if existing is not None:
        log.info("publish %s: moving tag %s of %s from %s to %s (only the card changed)", d.kind, d.tag, d.repo_id, existing[:8], commit[:8])
        hub.api.delete_tag(d.repo_id, tag=d.tag)
    try:
        hub.api.create_tag(d.repo_id, tag=d.tag, revision=commit, tag_message=d.message)
    except HfHubHTTPError as e:
        if _status(e) != 409:
            raise
        tags = {t.name: t.target_commit for t in hub.api.list_repo_refs(d.repo_id).tags}
        if tags.get(d.tag) != commit:  # a lost answer made it already, or someone else did
            raise AlignpressError(f"the tag '{d.tag}' of {d.repo_id} was just created on another commit: set publish.tag to a new name", field="publish.tag") from None


def verify(hub: Hub, d: Destination, commit: str, private: bool) -> bool:
    """The pushed revision holds exactly the uploaded files, the card reads back, the tag and the
    private flag hold; returns whether the repo is private."""
    from huggingface_hub import ModelCard

    repo = d.repo_id
    remote = hub.call(f"listing the pushed files of {repo}", lambda: tree(hub, repo, commit))
    changed, stale = differences(d, remote)
    problems = [f"{u.path} is {'missing' if u.path not in remote else 'different'}" for u in changed] + [f"{p} should not be there" for p in stale]
    tags = {t.name: t.target_commit for t in hub.call(f"listing the tags of {repo}", lambda: hub.api.list_repo_refs(repo)).tags}
    if tags.get(d.tag) != commit:
        problems.append(f"tag {d.tag} points at {tags.get(d.tag)}, not {commit}")
    info = hub.call(f"looking up {repo}", lambda: hub.api.repo_info(repo))
    if private and not info.private:
        problems.append("the repo is public although publish.private is true")
    path = hub.call(f"downloading the card of {repo}", lambda: hub.api.hf_hub_download(repo, "README.md", revision=commit, cache_dir=hub.tmp.name))
    readme = Path(path).read_bytes()
    if readme != d.files["README.md"].data:
        problems.append("README.md reads back different")
    else:
        data = ModelCard(readme.decode()).data
        if data.library_name != d.card_library or "dpo" not in (data.tags or []):
            problems.append(f"the card's metadata reads back wrong (library_name {data.library_name!r}, tags {data.tags})")
    if problems:
        raise StageFailed(f"verification of {repo}@{commit[:8]} failed: {'; '.join(problems)}. {hub.rerun}")
    return bool(info.private)


def check_access(hub: Hub, recipe: Recipe, run_ids: list[str]) -> tuple[str, dict[str, dict[str, str]]]:
    """whoami and the existing-repo checks for every destination: (user, {repo_id: its tags})."""
    dests = targets(recipe)
    repo_ids = list(dict.fromkeys(repo for _, repo, _ in dests))
    user = check_identity(hub, repo_ids)
    tags = {r: check_repo(hub, recipe, run_ids, r, [b for _, repo, b in dests if repo == r]) for r in repo_ids}
    return user, tags


def _token_or_fail(run_dir: RunDir) -> str:
    token = find_token()
    if not token:
        raise AlignpressError(
            f"publish.repo_id is set but there is no Hub token: set HF_TOKEN (or log in with `hf auth login`), "
            f"or unset publish.repo_id to keep the model in {run_dir.model} only",
            field="publish.repo_id",
        )
    if problem := token_problem(token):
        # It would fail every request (a header cannot carry it) after retries, as a Hub failure,
        # and the library's message quotes the header with the token in it.
        where = "HF_TOKEN" if (os.environ.get("HF_TOKEN") or "").strip() else "the stored Hub token (hf auth login)"
        raise AlignpressError(f"{where} {problem}: copy the token again from https://huggingface.co/settings/tokens")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise AlignpressError(f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset it and run again (the model stays in {run_dir.model})")
    return token


def _quiet_http() -> None:
    for name in ("httpx2", "httpx"):  # their INFO line per request drowns the stage's own messages
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def preflight(recipe: Recipe, run_dir: RunDir) -> str | None:
    """Before `run` prepares anything: will the push at its end be allowed? Nothing is written.

    The same checks publish makes before uploading (token, whoami, namespace, an existing repo's
    visibility and owner), so a run that could not publish fails in seconds, not after training.
    The tag and the secret scan need the finished files: publish makes those checks itself.
    Returns the Hub user name, or None when the recipe does not publish.
    """
    if not recipe.publish.repo_id:
        return None
    token = _token_or_fail(run_dir)
    _quiet_http()
    hub = Hub(token, "Nothing was written: fix the problem and run again")
    try:
        user, tags = check_access(hub, recipe, owned_run_ids(run_dir.load()))
        if recipe.publish.tag and not run_dir.is_done("export"):
            # The model is yet to be made, so it cannot be the one an existing tag names: publish
            # would refuse the tag after training
            for _, repo, branch in targets(recipe):
                tag = recipe.publish.tag if branch == "main" else f"{recipe.publish.tag}-adapter"
                if commit := tags.get(repo, {}).get(tag):
                    raise AlignpressError(f"the tag '{tag}' of {repo} already names a commit ({commit[:8]}), and this run's model is yet to be "
                                          "made: set publish.tag to a new name, or leave it unset (each run is then tagged with its run id)",
                                          field="publish.tag")
        kinds = [kind for kind, _, _ in targets(recipe)]
        check_card_metadata(hub, card.metadata(recipe), kinds)
    finally:
        hub.close()
    log.info("publish preflight: the token of '%s' may push to %s; the Hub accepts the card's metadata", user, ", ".join(dict.fromkeys(r for _, r, _ in targets(recipe))))
    if recipe.card.license and (base := card.base_license(recipe)) and base != recipe.card.license:
        # A recipe copied from another model's keeps its license line (the Phi-3 recipe says mit).
        log.warning("%s: card.license is %s, but the base model's card says %s: a fine-tune keeps its base's license unless "
                    "you mean otherwise; leave card.license unset to take the base's", recipe.where("card.license"), recipe.card.license, base)
    return user


# Fields of the card's metadata and the recipe field that sets each (license from the base card when
# card.license is unset: setting card.license is still the fix).
METADATA_FIELDS = {"license": "card.license", "language": "card.language", "tags": "card.tags", "datasets": "data.dataset", "base_model": "model.name_or_path"}


def metadata_error(error: ValueError, refusal: bool = False) -> AlignpressError | None:
    """The Hub's reasons for refusing a card's metadata as one line naming the recipe field, or None
    for another ValueError. `refusal`: the error is known to be one (ModelCard.validate raises the
    Hub's 400 answer as it came, JSON or text; a commit raises `Invalid metadata in README.md.` and
    the reasons, one per line)."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Invalid metadata in README.md"):
        lines = lines[1:]
    elif not refusal:
        return None
    try:
        answer = json.loads(text)
        reasons = [str(e.get("message", e)) for e in answer["errors"]] if isinstance(answer, dict) else lines
    except (ValueError, KeyError, TypeError, AttributeError):
        reasons = [line.removeprefix("- ") for line in lines]
    reasons = reasons or ["no reason given"]
    named = [f for key, f in METADATA_FIELDS.items() if any(re.search(rf'(^|\W){key}(\W|$)', r) for r in reasons)]
    return AlignpressError(f"the Hub refuses the model card's metadata: {'; '.join(reasons)}", field=named[0] if len(named) == 1 else None)


def check_card_metadata(hub: Hub, data, kinds: list[str]) -> None:
    """Ask the Hub whether it accepts the card's metadata block (its license list, among other rules),
    as it will when the README is committed: the metadata is known before training, the card's text
    is not. The same request huggingface_hub sends before a commit (ModelCard.validate)."""
    from huggingface_hub import ModelCard

    blocks = {"model": data, "adapter": adapter_card_data(data)}
    for kind in dict.fromkeys(kinds):
        text = f"---\n{blocks[kind].to_yaml()}\n---\n"

        def validate(text: str = text) -> None:
            try:
                ModelCard(text).validate(repo_type="model")
            except ValueError as e:
                raise metadata_error(e, refusal=True) from None

        hub.call(f"validating the {kind} card's metadata", validate)


# ---------------------------------------------------------------------------------------------
# The stage


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    p = recipe.publish
    if not p.repo_id:
        msg = f"no publish.repo_id: skipped the push; the finished model is in {run_dir.model}"
        print(msg, flush=True)
        return {"pushed": False, "reason": "no publish.repo_id"}
    token = _token_or_fail(run_dir)

    gate.check(recipe, run_dir)  # eval.gate_*: a model the evaluation failed is never pushed

    manifest = run_dir.load()
    rerun = (
        f"Nothing is lost: the finished model is in {run_dir.model}; run "
        f"`entrypoint.py publish {manifest.get('recipe_file', 'RECIPE')} --output-dir {run_dir.root}` (with the same --set flags) to finish the push"
    )
    dests = plan(recipe, run_dir, token)  # refuses before any request when a file holds a secret
    _quiet_http()
    hub = Hub(token, rerun)
    try:
        user, tags = check_access(hub, recipe, owned_run_ids(manifest))
        # A card-only change (card.license, say) reaches publish without run's preflight: ask before
        # the first commit, which would otherwise be refused half-way (exit 3, "try again")
        check_card_metadata(hub, _exported_card_data(recipe, run_dir), [d.kind for d in dests])
        for repo_id, repo_tags in tags.items():
            check_tags(hub, repo_id, repo_tags, [d for d in dests if d.repo_id == repo_id])
        results = []
        for d in dests:
            out = push(hub, d, p.private)
            private = verify(hub, d, out["commit"], p.private)
            url = f"{hub.api.endpoint.rstrip('/')}/{d.repo_id}" + (f"/tree/{d.branch}" if d.branch != "main" else "")
            results.append({
                "kind": d.kind, "repo_id": d.repo_id, "url": url, "branch": d.branch, "tag": d.tag, "private": private,
                "commit": out["commit"], "new_commit": out["new_commit"], "files": {u.path: u.size for u in sorted(d.files.values(), key=lambda u: u.path)},
            })
            what = "pushed" if out["new_commit"] else "already up to date, no new commit"
            print(f"{d.kind}: {what}: {url} (tag {d.tag}, commit {out['commit'][:8]}, {len(d.files)} files, {'private' if private else 'public'})", flush=True)
    finally:
        hub.close()
    record_pushes(run_dir, manifest["run_id"], results)
    return {"pushed": True, "user": user, "destinations": results}


def record_pushes(run_dir: RunDir, run_id: str, results: list[dict[str, Any]]) -> None:
    """run.json's `pushes`: every commit this folder pushed, oldest first. The publish stage records
    only the latest push, and a changed publish.repo_id or a new run (export changed) replaced it."""
    new = [{"run_id": run_id, **{k: r[k] for k in ("kind", "repo_id", "branch", "tag", "commit", "url")}} for r in results]
    seen = {(p["repo_id"], p["commit"]) for p in new}
    earlier = [p for p in run_dir.load().get("pushes", []) if (p["repo_id"], p["commit"]) not in seen]
    run_dir.update(pushes=[*earlier, *new])
