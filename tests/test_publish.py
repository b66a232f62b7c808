"""The publish stage against the test Hub server (tests/hubserver.py), with the real client.

Each test copies the finished demo run (conftest's session-scoped `demo_run`, built once) and
publishes it. The first push (exit 0), a 409 (exit 3) and invalid repo ids (exit 2) run
`entrypoint.py` in a subprocess, as a user does: hub_env's environment points it at the server
(HF_ENDPOINT, HF_TOKEN, HF_HOME; HF_HUB_DISABLE_XET=1 after `use_lfs()`). The other tests call
`cli.main` in this process (the same code and exit codes), so that retry waits can be patched.
Uploads go through Xet (a local CAS folder) by default, through git-LFS after `use_lfs()`.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http as hf_http

from alignpress import cli as alignpress_cli
from alignpress import publish
from alignpress.publish import Upload, adapter_card_data, scan
from conftest import ROOT, cli
from hubserver import GITATTRIBUTES, INVALID_TOKEN, OTHER_TOKEN, READ_TOKEN

REPO = "alice/demo-dpo"
RECIPE = "recipes/demo.yaml"
MODEL_FILES = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
PLOTS = ["eval_before_after.png", "train_curves.png"]  # export copies the run's plots next to the card
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
# The exported demo card's metadata (datasets left aside: card.metadata() takes the recipe's
# local data path for a Hub id there).
CARD_METADATA = {
    "language": ["en"],
    "library_name": "transformers",
    "license": "mit",
    "pipeline_tag": "text-generation",
    "tags": ["dpo", "trl", "alignpress", "lora", "demo", "arithmetic"],
}


@pytest.fixture
def out(demo_copy):
    return demo_copy


def run_id(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["run_id"]


def publish_stage(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["stages"]["publish"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def lfs_sizes(out: Path) -> list[int]:
    """Sizes of the binary files (weights, plots): the Hub stores them through LFS."""
    return sorted((out / "model" / n).stat().st_size for n in ["model.safetensors", *PLOTS])


def outputs(out: Path) -> dict[str, str]:
    """Every file of the output folder but the two each command rewrites."""
    return {k: v for k, v in snapshot(out).items() if k not in ("run.json", "recipe.resolved.yaml")}


def marker(out: Path) -> bytes:
    return json.dumps({"generator": "alignpress", "recipe": "demo", "run_id": run_id(out)}, indent=2).encode() + b"\n"


def run_cli(out: Path, *sets: str) -> int:
    """`entrypoint.py publish` in this process (sees monkeypatches); returns the exit code."""
    args = ["publish", str(ROOT / RECIPE), "--output-dir", str(out), "--set", f"publish.repo_id={REPO}"]
    for s in sets:
        args += ["--set", s]
    return alignpress_cli.main(args)


def run_process(out: Path, *sets: str):
    """`entrypoint.py publish` as a user runs it, in a subprocess (env from hub_env)."""
    args = ["publish", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={REPO}"]
    for s in sets:
        args += ["--set", s]
    return cli(*args, timeout=180)


@pytest.fixture
def no_waits(monkeypatch):
    """Retries without sleeping: ours (publish.RETRY_WAITS) and huggingface_hub's (recorded)."""
    sleeps: list[float] = []
    monkeypatch.setattr(publish, "RETRY_WAITS", (0, 0))
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    return sleeps


def check_model_repo(server, out: Path, token: str) -> None:
    """The pushed model: exact files and sizes, bytes, one commit, private, tagged, card metadata."""
    rid = run_id(out)
    model = out / "model"
    files = server.files(REPO)
    assert sorted(files) == sorted([".gitattributes", "README.md", "alignpress.json", *MODEL_FILES, *PLOTS])
    assert {n: files[n] for n in MODEL_FILES + PLOTS} == {n: (model / n).stat().st_size for n in MODEL_FILES + PLOTS}
    assert files[".gitattributes"] == len(GITATTRIBUTES)
    assert server.file_bytes(REPO, "model.safetensors") == (model / "model.safetensors").read_bytes()
    assert server.file_bytes(REPO, "alignpress.json") == marker(out)
    assert [c.title for c in server.commits(REPO)] == ["initial commit", f"alignpress demo: model from run {rid}"]
    assert server.is_private(REPO) is True
    assert server.tags(REPO) == {rid: server.head(REPO)}

    readme = server.file_bytes(REPO, "README.md").decode()
    data = ModelCard(readme).data.to_dict()
    assert data == CARD_METADATA
    assert "base_model_relation" not in data  # the demo's base is builtin, not a Hub model
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in readme and f"run `{rid}`" in readme
    assert "![training curves](train_curves.png)" in readme  # the card's images are in the repo

    assert server.find_bytes(token) == []
    stage = publish_stage(out)
    assert stage["status"] == "done"
    [dest] = stage["destinations"]
    assert dest == {
        "kind": "model", "repo_id": REPO, "url": f"{server.url}/{REPO}", "branch": "main", "tag": rid, "private": True,
        "commit": server.head(REPO), "new_commit": True, "files": {n: s for n, s in sorted(files.items()) if n != ".gitattributes"},
    }
    assert token not in (out / "run.json").read_text()


# --------------------------------------------------------------------------- pushes


@pytest.mark.parametrize("transport", ["lfs", "xet"])
def test_first_push_then_identical_rerun(hub_env, out, transport):
    server = hub_env.server
    if transport == "lfs":
        hub_env.use_lfs()
    # Files that must never leave the machine, holding the token: not on the allow-list.
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        (out / "model" / name).write_bytes(b"\x00pickle " + hub_env.token.encode())
    before = snapshot(out / "model")

    proc = run_process(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: pushed: {server.url}/{REPO} (tag {run_id(out)}" in proc.stdout
    assert hub_env.token not in proc.stdout + proc.stderr
    check_model_repo(server, out, hub_env.token)
    assert len(server.requests_to("commit")) == 1
    if transport == "lfs":
        assert sorted(r.body_size for r in server.requests_to("lfs_put")) == lfs_sizes(out)
        assert server.requests_to("xet_token") == []
    else:
        assert server.requests_to("lfs_put") == [] and len(server.requests_to("xet_token")) == 1
        assert server.file_entries(REPO)["model.safetensors"].xet_hash is not None

    # The same push again: no commit, no upload, same tag; the run is recorded as up to date.
    head = server.head(REPO)
    assert run_cli(out) == 0
    assert server.head(REPO) == head and len(server.commits(REPO)) == 2
    assert len(server.requests_to("commit")) == 1 and len(server.requests_to("preupload")) == 1
    assert server.tags(REPO) == {run_id(out): head}
    assert publish_stage(out)["destinations"][0]["new_commit"] is False
    assert snapshot(out / "model") == before


def test_a_restart_is_a_new_run_with_its_own_tag_in_the_same_repo(hub_env, out):
    """`export --restart` with other weights (bf16) gets a new run id: its push makes a new commit
    under a tag of its own, the first run's tag stays on its commit, and the repo the folder's
    earlier run published needs no allow_update. (With the old id the push was refused: the tag
    named a commit of other weights.)"""
    server = hub_env.server
    assert run_process(out).returncode == 0
    first, first_head = run_id(out), server.head(REPO)
    proc = cli("export", RECIPE, "--output-dir", out, "--restart", "--set", "export.dtype=bfloat16", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = run_id(out)
    assert second != first and f"--restart: run {second} (was {first})" in proc.stderr
    assert json.loads((out / "run.json").read_text())["previous_run_ids"] == [first]
    proc = run_process(out, "export.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = server.head(REPO)
    assert head != first_head and server.tags(REPO) == {first: first_head, second: head}
    assert server.file_bytes(REPO, "alignpress.json") == marker(out)  # the new run's id
    assert f"model: pushed: {server.url}/{REPO} (tag {second}" in proc.stdout


def test_a_changed_export_section_is_a_new_run_too(hub_env, out):
    """Without --restart: `run` with another export.dtype redoes the merge by itself, and kept the old
    run id, so its push was refused after the merge (the tag named a commit of other weights)."""
    server = hub_env.server
    assert run_process(out).returncode == 0
    first, first_head = run_id(out), server.head(REPO)
    proc = cli("run", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={REPO}", "--set", "export.dtype=bfloat16", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = run_id(out)
    assert second != first and f"export changed: run {second} (was {first})" in proc.stderr
    second_head = server.head(REPO)
    assert server.tags(REPO) == {first: first_head, second: second_head} and second_head != first_head
    # run.json keeps every push (the publish stage only the latest), and the summary shows the earlier ones
    pushes = json.loads((out / "run.json").read_text())["pushes"]
    assert [(p["run_id"], p["kind"], p["repo_id"], p["branch"], p["tag"], p["commit"]) for p in pushes] == [
        (first, "model", REPO, "main", first, first_head), (second, "model", REPO, "main", second, second_head)]
    earlier = [line.split(None, 2)[2] for line in proc.stdout.splitlines() if line.split()[:2] == ["earlier", "model:"]]
    assert earlier == [f"{server.url}/{REPO} (tag {first}, commit {first_head[:8]}, run {first})"]
    # A card-only change keeps the run and moves its tag (no new weights)
    proc = cli("run", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={REPO}", "--set", "export.dtype=bfloat16",
               "--set", "description=Says the answer.", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_id(out) == second and set(server.tags(REPO)) == {first, second}
    pushes = json.loads((out / "run.json").read_text())["pushes"]
    assert [p["commit"] for p in pushes] == [first_head, second_head, server.head(REPO)] and pushes[-1]["tag"] == second


def test_push_both_puts_the_adapter_on_its_own_branch(hub_env, out):
    server = hub_env.server
    rid = run_id(out)
    assert run_cli(out, "publish.push=both") == 0
    assert sorted(server.files(REPO, "adapter")) == sorted([".gitattributes", "README.md", "alignpress.json", *ADAPTER_FILES])
    same = [n for n in ADAPTER_FILES if n != "adapter_config.json"]
    assert {n: server.files(REPO, "adapter")[n] for n in same} == {n: (out / "adapter" / n).stat().st_size for n in same}
    # PEFT wrote the local folder the builtin base loaded from: no use elsewhere, and a path of this machine
    local = json.loads((out / "adapter/adapter_config.json").read_text())
    pushed = json.loads(server.file_bytes(REPO, "adapter_config.json", "adapter"))
    assert local["base_model_name_or_path"].startswith("/") and pushed == {**local, "base_model_name_or_path": None}
    assert sorted(server.files(REPO, "main")) == sorted([".gitattributes", "README.md", "alignpress.json", *MODEL_FILES, *PLOTS])
    # the branch starts at the repo's first commit: only the adapter in its history
    assert [c.title for c in server.commits(REPO, "adapter")] == ["initial commit", f"alignpress demo: adapter from run {rid}"]
    assert server.tags(REPO) == {rid: server.head(REPO, "main"), f"{rid}-adapter": server.head(REPO, "adapter")}
    readme = server.file_bytes(REPO, "README.md", "adapter").decode()
    data = ModelCard(readme).data.to_dict()
    assert data == {**CARD_METADATA, "library_name": "peft"}
    assert f'tok = AutoTokenizer.from_pretrained("{REPO}", revision="adapter")' in readme
    assert ("base = AutoModelForCausalLM.from_pretrained(BASE)  # the base model `builtin:tiny-phi3-arithmetic`: not on the Hub\n"
            f'model = PeftModel.from_pretrained(base, "{REPO}", revision="adapter")') in readme
    assert "merged into the base weights" not in readme and ".png" not in readme

    # Again: nothing new on either branch.
    heads = server.branches(REPO)
    assert run_cli(out, "publish.push=both") == 0
    assert server.branches(REPO) == heads and len(server.requests_to("commit")) == 2


def test_adapter_card_metadata_for_a_hub_base():
    from huggingface_hub import ModelCardData

    exported = ModelCardData(license="mit", library_name="transformers", base_model="microsoft/Phi-3-mini-4k-instruct",
                             base_model_relation="finetune", tags=["dpo", "trl"], pipeline_tag="text-generation")
    assert adapter_card_data(exported).to_dict() == {
        "base_model": "microsoft/Phi-3-mini-4k-instruct", "base_model_relation": "adapter", "library_name": "peft",
        "license": "mit", "pipeline_tag": "text-generation", "tags": ["dpo", "trl"],
    }


# --------------------------------------------------------------------------- refusals


def test_existing_public_repo_is_refused_when_private_is_asked(hub_env, out, capsys):
    server = hub_env.server
    server.add_repo(REPO, private=False)
    assert run_cli(out) == 2
    assert f"{REPO} already exists and is public, but publish.private is true" in capsys.readouterr().err
    assert len(server.commits(REPO)) == 1 and server.requests_to("preupload") == [] and server.requests_to("commit") == []
    assert server.is_private(REPO) is False
    assert publish_stage(out)["status"] == "failed"


def test_a_card_license_the_hub_refuses_stops_publish_before_any_commit(hub_env, out, capsys):
    """A card-only change reaches `publish` without run's preflight: the Hub refused the README at the
    commit, after the repo was created, and it read as a Hub failure to retry (exit 3)."""
    assert run_cli(out, "card.license=mit-ish") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --set card.license: field 'card.license': the Hub refuses the model card's metadata: \"license\" must be one of [apache-2.0, mit, "), err
    assert hub_env.server.repo_ids() == [] and hub_env.server.requests_to("commit") == []
    assert [r.route for r in hub_env.server.requests][-1] == "validate_yaml"


def test_existing_repo_needs_allow_update(hub_env, out, capsys):
    server = hub_env.server
    server.add_repo(REPO, private=True, files={"notes.txt": b"someone else's notes\n"})
    assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert f"{REPO} already exists and was not published by this run" in err and "publish.allow_update: true" in err
    assert server.requests_to("commit") == []

    assert run_cli(out, "publish.allow_update=true") == 0
    files = server.files(REPO)
    assert sorted(files) == sorted([".gitattributes", "notes.txt", "README.md", "alignpress.json", *MODEL_FILES, *PLOTS])  # notes.txt kept
    assert len(server.commits(REPO)) == 3


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (INVALID_TOKEN, "the Hub rejected the token while checking the token (whoami) (HTTP 401"),
        (READ_TOKEN, "the token of 'alice' is read-only"),
        (OTHER_TOKEN, "the token belongs to 'bob', who cannot write to the namespace 'alice'"),
    ],
)
def test_bad_tokens_are_refused_before_any_write(hub_env, out, capsys, monkeypatch, token, message):
    monkeypatch.setenv("HF_TOKEN", token)
    assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert message in err and token not in err
    assert hub_env.server.repo_ids() == []
    assert [r.route for r in hub_env.server.requests] == ["whoami"]


def test_403_from_the_hub_is_a_clear_refusal(hub_env, out, capsys):
    hub_env.server.inject("POST", r"^/api/repos/create$", 403, message="You don't have the rights to create a model under this namespace")
    assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert f"the token may not do this while creating {REPO} (HTTP 403: You don't have the rights" in err
    assert hub_env.server.repo_ids() == []


def test_planted_token_is_refused_and_nothing_is_sent(hub_env, out, capsys):
    server, token = hub_env.server, hub_env.token
    config = out / "model" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length"', f'"hub_token": "{token}",\n  "model_max_length"'))
    before = snapshot(out / "model")
    assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert f"refusing to push: {config}: the Hub token in use at line" in err and "Nothing was uploaded" in err
    assert token not in err and token not in (out / "run.json").read_text()
    assert server.requests == [] and server.repo_ids() == [] and server.find_bytes(token) == []
    assert snapshot(out / "model") == before


def test_invalid_repo_id_is_refused_before_training(tmp_path):
    for bad in ("alice/bad--name", "no-namespace", "alice/name.git"):
        out = tmp_path / "out"
        proc = cli("run", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={bad}", timeout=60)
        assert proc.returncode == 2
        assert f"--set publish.repo_id: field 'publish.repo_id': '{bad}'" in proc.stderr
        assert not out.exists()


def test_no_token_is_an_error(hub_env, out, capsys, monkeypatch):
    """publish.repo_id asks for a push: without a token that is a failure the user must see (exit 2),
    and the stage stays failed so the next `run` or `publish` with a token completes it."""
    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(out) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --set publish.repo_id: field 'publish.repo_id': publish.repo_id is set but there is no Hub token: set HF_TOKEN "
        f"(or log in with `hf auth login`), or unset publish.repo_id to keep the model in {out / 'model'} only"
    )
    assert hub_env.server.requests == []
    assert publish_stage(out)["status"] == "failed"


# --------------------------------------------------------------------------- Hub failures


def test_409_on_create_is_a_clear_error(hub_env, out):
    hub_env.server.inject("POST", r"^/api/repos/create$", 409, times=None, message="Conflict")
    proc = run_process(out)
    assert proc.returncode == 3
    assert f"the Hub answered 409 Conflict creating {REPO}, yet the repo is not visible to this token" in proc.stderr
    assert "entrypoint.py publish recipes/demo.yaml" in proc.stderr
    assert hub_env.server.repo_ids() == []
    assert publish_stage(out)["status"] == "failed"


def test_429_and_5xx_are_retried_then_a_clear_error(hub_env, out, capsys, no_waits):
    server = hub_env.server
    # 429 once on preupload: huggingface_hub retries it, the push succeeds.
    server.inject("POST", r"/preupload/", 429, times=1)
    assert run_cli(out) == 0
    assert [r.status for r in server.requests_to("preupload")] == [429, 200]
    assert no_waits == [1.0]  # Retry-After: 0, plus the client's 1 s

    # A persistent 503 on the commit (the client does not retry it): this stage tries 3 times.
    head = server.head(REPO)
    (out / "model" / "generation_config.json").write_text((out / "model" / "generation_config.json").read_text() + "\n")
    server.inject("POST", r"/commit/", 503, times=None)
    assert run_cli(out, "publish.tag=second") == 3
    err = capsys.readouterr().err
    assert f"publish failed while pushing the model to {REPO}@main after 3 attempts: HTTP 503: Injected fault: HTTP 503." in err
    assert "Nothing is lost" in err
    assert [r.status for r in server.requests_to("commit")][1:] == [503, 503, 503]
    assert server.head(REPO) == head and publish_stage(out)["status"] == "failed"

    # A persistent 500 on preupload: the client retries 5 times per attempt, then us.
    server.clear_faults()
    server.inject("POST", r"/preupload/", 500, times=None)
    seen = len(server.requests_to("preupload"))
    assert run_cli(out, "publish.tag=second") == 3
    assert "after 3 attempts: HTTP 500" in capsys.readouterr().err
    assert [r.status for r in server.requests_to("preupload")][seen:] == [500] * 18

    # The Hub is back: the re-run completes the push.
    server.clear_faults()
    assert run_cli(out, "publish.tag=second") == 0
    assert len(server.commits(REPO)) == 3 and server.tags(REPO)["second"] == server.head(REPO)
    assert publish_stage(out)["status"] == "done"


def test_a_hub_retry_is_reported_once(hub_env, out):
    """huggingface_hub prints its retry warning through its own handler; alignpress's logging must not repeat it."""
    hub_env.server.inject("POST", r"/preupload/", 429, times=1)
    proc = run_process(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    retries = [line for line in proc.stderr.splitlines() if "Rate limited. Waiting" in line]
    assert retries == ["Rate limited. Waiting 1.0s before retry [Retry 1/5]."]
    assert not any(line.startswith("[alignpress]") and "Retry" in line for line in proc.stderr.splitlines())


@pytest.mark.parametrize("transport", ["lfs", "xet"])
def test_interrupted_upload_then_rerun_completes(hub_env, out, capsys, no_waits, transport):
    server = hub_env.server
    if transport == "lfs":
        hub_env.use_lfs()
    before = outputs(out)
    server.interrupt("POST", r"/commit/", times=None)  # the connection drops on every commit
    assert run_cli(out) == 3
    err = capsys.readouterr().err
    assert f"publish failed while pushing the model to {REPO}@main after 3 attempts: " in err
    assert [c.title for c in server.commits(REPO)] == ["initial commit"] and server.tags(REPO) == {}
    assert publish_stage(out)["status"] == "failed"
    assert outputs(out) == before  # the output folder is untouched

    server.clear_faults()
    assert run_cli(out) == 0  # an empty repo counts as this run's: no allow_update needed
    check_model_repo(server, out, hub_env.token)
    if transport == "lfs":  # the blobs reached the server on the first try: not sent again
        assert sorted(r.body_size for r in server.requests_to("lfs_put")) == lfs_sizes(out)


def test_lost_commit_answer_makes_no_second_commit(hub_env, out, no_waits):
    server = hub_env.server
    server.interrupt("POST", r"/commit/", process=True)  # the commit is made, its answer lost
    assert run_cli(out) == 0
    assert [r.status for r in server.requests_to("commit")] == [None]
    check_model_repo(server, out, hub_env.token)


# --------------------------------------------------------------------------- secret scan


HEADER = b'{"__metadata__":{"token":"a1b2c3d4e5f6a7b8c9"}}'


def _upload(tmp_path: Path, name: str, data: bytes) -> Upload:
    path = tmp_path / name
    path.write_bytes(data)
    return Upload(name, len(data), "", None, source=path)


@pytest.mark.parametrize(
    ("name", "data", "found"),
    [
        ("config.json", b'{\n  "a": 1,\n  "note": "hf_abcdefghijklmnopqrstuvwxyz0123456789"\n}', "Hugging Face token at line 3"),
        ("README.md", b"# x\naws: AKIAABCDEFGHIJKLMNOP\n", "AWS access key id at line 2"),
        ("tokenizer.json", b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key block at line 1"),
        ("config.json", b'{"wandb_api_key": "0123456789abcdef0123456789abcdef"}', "'api_key' assignment at line 1"),
        ("chat_template.jinja", b"password = hunter2hunter2hunter2x\n", "'password' assignment at line 1"),
        ("model.safetensors", len(HEADER).to_bytes(8, "little") + HEADER + b"\x00" * 16, "'token' assignment in its safetensors header"),
        ("model.safetensors", b"\x00" * 5000 + b"api_org_abcdefghijklmnopqrstuvwxyz0123", "Hugging Face org API token at byte 5000"),
        ("README.md", b"# x\nruns: https://alice:s3cretPassw0rd99@mlflow.example.com/#/runs/1\n", "password in a URL at line 2"),
    ],
)
def test_secret_patterns(tmp_path, name, data, found):
    u = _upload(tmp_path, name, data)
    assert scan(u, "hf_someOtherTokenThatIsNotInTheFile0000") == f"{u.source}: {found}"


def test_scan_streams_large_files_and_ignores_tokenizer_words(tmp_path, monkeypatch):
    token = "hf_testAliceWriteToken0000000000000"
    monkeypatch.setattr(publish, "TEXT_SCAN_LIMIT", 1000)
    data = bytes(8 << 20)[:-10] + token.encode()[:10]  # the token straddles the 8 MiB block boundary
    data += token.encode()[10:] + bytes(100)
    u = _upload(tmp_path, "model.safetensors", data)
    assert scan(u, token) == f"{u.source}: the Hub token in use at byte {(8 << 20) - 10}"
    clean = b'{"pad_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}'
    assert scan(_upload(tmp_path, "tokenizer_config.json", clean), token) is None


def test_metadata_refusals_become_one_line_naming_the_field():
    """The two forms huggingface_hub raises the Hub's metadata refusal in: ModelCard.validate passes the
    400 answer on as it came; a commit's README check lists the reasons after a first line."""
    from alignpress.publish import metadata_error

    answer = json.dumps({"errors": [{"message": '"license" must be one of [apache-2.0, mit]'}], "warnings": []})
    assert str(metadata_error(ValueError(answer), refusal=True)) == "field 'card.license': the Hub refuses the model card's metadata: \"license\" must be one of [apache-2.0, mit]"
    commit = ValueError('Invalid metadata in README.md.\n- "license" must be one of [mit]\n- "language" must be an array')
    assert str(metadata_error(commit)) == "the Hub refuses the model card's metadata: \"license\" must be one of [mit]; \"language\" must be an array"
    assert str(metadata_error(ValueError('Invalid metadata in README.md.\n- "base_model" is not a valid model ID'))) == (
        "field 'model.name_or_path': the Hub refuses the model card's metadata: \"base_model\" is not a valid model ID")
    assert metadata_error(ValueError("something else")) is None
    assert str(metadata_error(ValueError("plain text reason"), refusal=True)) == "the Hub refuses the model card's metadata: plain text reason"


@pytest.mark.parametrize(("token", "kind", "position"), [("hf_SECRET\n000000", "whitespace", 10), ("hf_SECRETé000", "a non-ASCII character", 10)])
def test_a_token_no_header_can_carry_is_refused_at_the_door(hub_env, out, capsys, monkeypatch, token, kind, position):
    """A newline inside the token, or a non-ASCII character: each request failed (exit 3 after
    retries, as if the Hub were down) and the library's message quoted the token."""
    monkeypatch.setenv("HF_TOKEN", token)
    assert run_cli(out) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: HF_TOKEN holds {kind} at position {position}, which no Hub token has: copy the token again "
                                    "from https://huggingface.co/settings/tokens")
    assert "SECRET" not in err and hub_env.server.requests == []


def test_run_stops_before_the_merge_when_the_gate_refuses(hub_env, out):
    """The gate's verdict is known after evaluate: `run` stops there instead of merging and saving
    a model (GPU minutes) that publish would then refuse. The old export stays as it was. (The folder
    is as a run leaves it after evaluate: export still to come. With export done, a new threshold only
    writes the cards again: test_lostwork.)"""
    manifest = json.loads((out / "run.json").read_text())
    manifest["stages"]["export"] = manifest["stages"]["publish"] = {"status": "pending"}
    (out / "run.json").write_text(json.dumps(manifest))
    model_before = snapshot(out / "model")
    proc = cli("run", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={REPO}", "--set", "eval.gate_max_kl=0.01")
    assert proc.returncode == 3, proc.stderr[-3000:]
    ev = json.loads((out / "metrics" / "eval.json").read_text())
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --set eval.gate_max_kl: field 'eval.gate_max_kl': publish gate: the KL estimate from the base, {ev['aligned']['kl_estimate']:.4g} nats "
        f"per answer, exceeds the limit 0.01. Nothing was exported or pushed (`export` merges the model anyway) (numbers in {out / 'metrics' / 'eval.json'})")
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert (stages["evaluate"]["status"], stages["export"]["status"], stages["publish"]["status"]) == ("done", "pending", "pending")
    assert "== export" not in proc.stderr and snapshot(out / "model") == model_before
    assert hub_env.server.requests_to("commit") == []


def test_a_token_with_its_newline_is_used_stripped_and_never_quoted(monkeypatch):
    """HF_TOKEN pasted with a newline: every request failed and the error quoted the whole token
    (escaped as "...\\n", so the exact-token scrub missed it), on the terminal and in run.json."""
    from alignpress.errors import redact
    from alignpress.publish import find_token

    monkeypatch.setenv("HF_TOKEN", "hf_PROBESECRET1234567890abcdefghijklmnop\n")
    assert find_token() == "hf_PROBESECRET1234567890abcdefghijklmnop"
    quoted = "LocalProtocolError: Illegal header value b'Bearer hf_PROBESECRET1234567890abcdefghijklmnop\\n'"
    assert redact(quoted) == "LocalProtocolError: Illegal header value b'Bearer <token>\\n'"
    assert redact("https://alice:pw0rd@h.example/x, http://h:8080/y") == "https://alice:<password>@h.example/x, http://h:8080/y"


def test_a_repo_another_run_published_needs_allow_update(hub_env, out, capsys):
    """Its alignpress.json names another run (a colleague's, another recipe's): not this folder's to update."""
    server = hub_env.server
    server.add_repo(REPO, private=True, files={"alignpress.json": b'{"generator": "alignpress", "recipe": "demo", "run_id": "someone-else"}\n'})
    assert run_cli(out) == 2
    assert f"{REPO} already exists and was not published by this run (run {run_id(out)})" in capsys.readouterr().err
    assert server.requests_to("commit") == []


def test_a_tag_naming_other_weights_is_not_moved(hub_env, out, capsys):
    """publish.tag kept across a new model: the tag names the first model's commit and stays there."""
    server = hub_env.server
    assert run_process(out, "publish.tag=v1").returncode == 0
    tagged = server.tags(REPO)["v1"]
    assert cli("export", RECIPE, "--output-dir", out, "--restart", "--set", "export.dtype=bfloat16", timeout=300).returncode == 0
    proc = run_process(out, "publish.tag=v1", "export.dtype=bfloat16")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --set publish.tag: field 'publish.tag': the tag 'v1' of {REPO} already names a commit with other files (")
    assert server.tags(REPO)["v1"] == tagged and len(server.commits(REPO)) == 2
