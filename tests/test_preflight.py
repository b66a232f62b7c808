"""Hub preflight: `run` with publish.repo_id checks the token and the repo before prepare.

Every case runs `entrypoint.py run` in a subprocess against the test Hub server
(tests/hubserver.py, through hub_env's HF_ENDPOINT/HF_TOKEN/HF_HOME): a refusal exits 2 with one
`error:` line and leaves no output folder at all (so no data/ and no checkpoints/).
"""

from __future__ import annotations

import json

import pytest

from conftest import cli
from hubserver import INVALID_TOKEN, OTHER_TOKEN, READ_TOKEN

REPO = "alice/demo-dpo"
RECIPE = "recipes/demo.yaml"


def run(out, *sets, env=None):
    args = ["run", RECIPE, "--output-dir", out, "--set", f"publish.repo_id={REPO}"]
    for s in sets:
        args += ["--set", s]
    return cli(*args, env=env, timeout=600)


def refused(proc, out) -> str:
    """The one error line of a refused run; checks nothing was written."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "== prepare" not in proc.stderr
    assert not out.exists()  # no data/, no checkpoints/, not even run.json
    return errors[0]


def test_no_token_is_an_error_not_a_skip(hub_env, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "out"
    line = refused(run(out), out)
    assert line == (
        "error: --set publish.repo_id: field 'publish.repo_id': publish.repo_id is set but there is no Hub token: set HF_TOKEN "
        f"(or log in with `hf auth login`), or unset publish.repo_id to keep the model in {out / 'model'} only"
    )
    assert hub_env.server.requests == []


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (INVALID_TOKEN, "error: the Hub rejected the token while checking the token (whoami) (HTTP 401"),
        (READ_TOKEN, "error: the token of 'alice' is read-only: create a token with write access"),
        (OTHER_TOKEN, "error: --set publish.repo_id: field 'publish.repo_id': the token belongs to 'bob', who cannot write to the namespace 'alice' (writable: bob)"),
    ],
)
def test_bad_token_stops_before_prepare(hub_env, tmp_path, token, message):
    out = tmp_path / "out"
    line = refused(run(out, env={"HF_TOKEN": token}), out)
    assert line.startswith(message) and token not in line
    assert [r.route for r in hub_env.server.requests] == ["whoami"]
    assert hub_env.server.repo_ids() == []


def test_existing_public_repo_when_private_is_asked(hub_env, tmp_path):
    hub_env.server.add_repo(REPO, private=False)
    out = tmp_path / "out"
    line = refused(run(out), out)
    assert line == (
        f"error: {RECIPE}: field 'publish.private': {REPO} already exists and is public, but publish.private is true: refusing to push. "
        "Make it private on the Hub (repo Settings), or set publish.private: false to publish publicly"
    )
    assert hub_env.server.is_private(REPO) is False and len(hub_env.server.commits(REPO)) == 1


def test_existing_repo_of_someone_else_needs_allow_update(hub_env, tmp_path):
    hub_env.server.add_repo(REPO, private=True, files={"notes.txt": b"someone else's notes\n"})
    out = tmp_path / "out"
    line = refused(run(out), out)
    assert line.startswith(f"error: {RECIPE}: field 'publish.allow_update': {REPO} already exists and was not published by this run: refusing")  # a fresh folder has no run id yet: no '(run None)'
    assert "Set publish.allow_update: true" in line
    assert hub_env.server.requests_to("commit") == []


def test_a_good_token_passes_and_the_run_publishes(hub_env, tmp_path):
    """The whole short demo (2 steps, no evaluation) with a push at its end."""
    out = tmp_path / "out"
    proc = run(out, "train.max_steps=2", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert f"[alignpress] publish preflight: the token of 'alice' may push to {REPO}" in err
    assert err.index("publish preflight") < err.index("== prepare")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stages"]["publish"]["pushed"] is True
    assert hub_env.server.tags(REPO) == {manifest["run_id"]: hub_env.server.head(REPO)}
    assert hub_env.token not in err + proc.stdout + (out / "run.json").read_text()


def test_a_license_the_hub_does_not_know_stops_before_prepare(hub_env, tmp_path):
    """The Hub checks a README's metadata when it is committed: asked at the door instead, not after
    training. (The test server refuses licenses outside the list the real Hub's message gives.)"""
    out = tmp_path / "out"
    line = refused(run(out, "card.license=mit-ish"), out)
    assert line.startswith("error: --set card.license: field 'card.license': the Hub refuses the model card's metadata: \"license\" must be one of [apache-2.0, mit, ")
    assert line.endswith(", gemma, unknown, other, array]")
    assert [r.route for r in hub_env.server.requests] == ["whoami", "repo_info", "validate_yaml"]
    assert hub_env.server.requests_to("commit") == []


def test_the_adapter_card_is_checked_too(hub_env, tmp_path):
    out = tmp_path / "out"
    line = refused(run(out, "card.license=mit-ish", "publish.push=adapter"), out)
    assert line.startswith("error: --set card.license: field 'card.license': the Hub refuses the model card's metadata: \"license\" must be one of [apache-2.0,")
    assert [r.route for r in hub_env.server.requests][-1] == "validate_yaml"


def test_validate_hub_asks_the_same_before_a_launch(hub_env, tmp_path, capsys):
    """`validate --hub` on a laptop: the preflight `run` makes on the rented VM, before launching it."""
    from alignpress.cli import main

    def validate(*sets):
        args = ["validate", RECIPE, "--hub"]
        for s in sets:
            args += ["--set", s]
        rc = main(args)
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    def hub_line(out):
        (line,) = [x for x in out.splitlines() if x.startswith("# hub: ")]
        return line

    rc, out, err = validate(f"publish.repo_id={REPO}")
    assert rc == 0, err
    assert hub_line(out) == f"# hub: the token of 'alice' may push to {REPO}; the Hub accepts the card's metadata"
    rc, out, err = validate(f"publish.repo_id={REPO}", "card.license=mit-ish")
    assert (rc, out) == (2, "") and err.startswith("error: --set card.license: field 'card.license': the Hub refuses the model card's metadata: \"license\" must be one of [")
    rc, out, err = validate()
    assert (rc, hub_line(out)) == (0, "# hub: publish.repo_id is not set: nothing would be pushed (set it, or sky/run.sh sets it from HUB_REPO)")
    assert hub_env.token not in out + err
    assert hub_env.server.requests_to("commit") == [] and hub_env.server.repo_ids() == []


# A dataset card as the datasets library writes it on push (the `dataset_info` block), with the seed
# dataset's columns and size (../shared/reference/models-and-data.md: 7,563 rows, one split).
CAPYBARA_COLUMNS = ["source", "conversation", "original_response", "generation_prompt", "raw_generation_responses", "new_generations",
                    "prompt", "chosen", "rejected", "rating_chosen", "rating_rejected", "chosen_model", "rejected_model"]
CAPYBARA_CARD = "---\n" + "dataset_info:\n  features:\n" + "".join(f"  - name: {c}\n    dtype: string\n" for c in CAPYBARA_COLUMNS) + \
    "  splits:\n  - name: train\n    num_bytes: 1000\n    num_examples: 7563\n---\n# capybara-like\n"


def test_validate_hub_checks_the_model_and_the_data_before_a_launch(hub_env, tmp_path, tiny_phi3, capsys):
    """The base model's config and a Hub dataset's card, asked of the Hub (real huggingface_hub and
    transformers over HTTP to the test server); without --hub both are deferred to the VM."""
    from alignpress.cli import main

    api = hub_env.api()
    api.create_repo("alice/capybara-like", repo_type="dataset")
    api.upload_file(path_or_fileobj=CAPYBARA_CARD.encode(), path_in_repo="README.md", repo_id="alice/capybara-like", repo_type="dataset")
    api.create_repo("alice/no-card", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"{}\n", path_in_repo="data.jsonl", repo_id="alice/no-card", repo_type="dataset")
    api.create_repo("alice/tiny-phi3")
    api.upload_file(path_or_fileobj=str(tiny_phi3 / "config.json"), path_in_repo="config.json", repo_id="alice/tiny-phi3")
    base = ["model.name_or_path=alice/tiny-phi3", "data.dataset=alice/capybara-like", "data.split=train[300:2500]", "data.eval_split=train[:300]"]

    def validate(*sets, hub=True):
        args = ["validate", RECIPE] + (["--hub"] if hub else [])
        for s in [*base, *sets]:
            args += ["--set", s]
        rc = main(args)
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    rc, out, err = validate(hub=False)
    assert rc == 0 and out.splitlines()[1].startswith("# model checks deferred: the config of 'alice/tiny-phi3' is not on this machine")
    rc, out, err = validate()
    assert (rc, err) == (0, "")
    notes = out.splitlines()[1:4]
    assert notes[0] == ("# model checks passed on Phi3ForCausalLM (config from alice/tiny-phi3, meta device); LoRA on down_proj, gate_up_proj, "
                        "o_proj, qkv_proj; attention sdpa; sequences up to 64 tokens")
    assert notes[1] == "# data: alice/capybara-like (Hub dataset, by its card: 2200 rows in train[300:2500], 300 rows in train[:300]; 13 columns checked)"
    # Now in the cache, the config is found without --hub too.
    rc, out, err = validate(hub=False)
    assert (rc, out.splitlines()[1:3]) == (0, [notes[0], "# data: alice/capybara-like (Hub dataset: read by prepare; `validate --hub` checks its card)"])
    rc, out, err = validate("data.dataset=alice/no-card")
    assert (rc, out.splitlines()[2]) == (0, "# data: alice/no-card (Hub dataset found; its card states no splits or columns: read by prepare)")

    columns = ", ".join(sorted(CAPYBARA_COLUMNS))
    refusals = [
        ("data.split=train[8000:]", "field 'data.split': split 'train[8000:]' of alice/capybara-like has no rows (the whole split has 7563, by its card)"),
        ("data.eval_split=test", "field 'data.eval_split': 'alice/capybara-like' has no split 'test' (its splits: train)"),
        ("data.filters.min.rating_choosen=4", f"field 'data.filters.min.rating_choosen': column 'rating_choosen' is not in alice/capybara-like "
                                              f"(its columns, by its card: {columns})"),
        ("data.columns.prompt=question", f"field 'data.columns.prompt': column 'question' is not in alice/capybara-like (its columns, by its card: {columns})"),
        ("data.format=system_question", "field 'data.format': format 'system_question' needs columns question, chosen, rejected; missing question in "
                                        "alice/capybara-like"),
        ("lora.target_modules=[q_projj]", "field 'lora.target_modules': 'q_projj' matches no module of Phi3ForCausalLM; did you mean 'qkv_proj'?"),
        ("data.dataset=alice/missing", "field 'data.dataset': could not find Hub dataset 'alice/missing': RepositoryNotFoundError: "),
        ("model.name_or_path=alice/missing-model", "field 'model.name_or_path': could not load 'alice/missing-model': "),
    ]
    for override, message in refusals:
        rc, out, err = validate(override)
        assert (rc, out) == (2, ""), (override, err)
        assert err.startswith(f"error: --set {override.split('=')[0]}: {message}") and err.count("\n") == 1, (override, err)
    assert hub_env.token not in out + err
    assert len(hub_env.server.requests_to("commit")) == 3  # the test's own uploads: validate writes nothing

    # Configurations: a card listing two (as datasets writes it for several), neither the default.
    two = "---\ndataset_info:\n" + "".join(
        f"- config_name: {c}\n  features:\n  - name: chosen\n    dtype: string\n  - name: rejected\n    dtype: string\n"
        f"  splits:\n  - name: train\n    num_examples: {n}\n" for c, n in (("en", 500), ("fr", 80))) + "---\n"
    api.create_repo("alice/two-configs", repo_type="dataset")
    api.upload_file(path_or_fileobj=two.encode(), path_in_repo="README.md", repo_id="alice/two-configs", repo_type="dataset")
    sets = ["data.dataset=alice/two-configs", "data.format=implicit", "data.filters.min={}", "data.filters.max={}"]
    rc, out, err = validate(*sets, "data.config_name=fr", "data.split=train[20:]", "data.eval_split=train[:20]")
    assert (rc, err, out.splitlines()[2]) == (0, "", "# data: alice/two-configs (Hub dataset, by its card: 60 rows in train[20:], 20 rows in train[:20]; "
                                                     "2 columns checked)")
    for override, message in [
        ("data.config_name=fr", "field 'data.split': split 'train[300:2500]' of alice/two-configs has no rows (the whole split has 80, by its card)"),
        ("data.config_name=de", "field 'data.config_name': 'alice/two-configs' has no configuration 'de' (its configurations, by its card: en, fr)"),
        ("data.format=implicit", "field 'data.config_name': 'alice/two-configs' has several configurations and none is the default: name one "
                                 "(its configurations, by its card: en, fr)"),
    ]:
        rc, out, err = validate(*sets, override)
        assert (rc, out) == (2, ""), (override, err)
        assert err.split(": ", 2)[2] == message + "\n", (override, err)  # after `error: --set FLAG` or `error: FILE`


def test_the_disk_check_counts_a_hub_models_download_until_it_is_cached(hub_env, tmp_path, tiny_phi3):
    """The base model's weights, downloaded into the Hub cache by training, count against the
    cache's disk until huggingface_hub has them (real client and cache layout, the test server's
    files); on a disk too small for them `run` stops at the door, naming the cache folder."""
    import subprocess
    from pathlib import Path

    from huggingface_hub import snapshot_download

    from alignpress import disk
    from alignpress.checks import model_sizes
    from alignpress.recipe import load_recipe
    from alignpress.runstate import RunDir
    from conftest import ROOT
    from test_lostwork import DISK_FIX, _tmpfs

    api = hub_env.api()
    api.create_repo("alice/tiny-phi3-weights")
    api.upload_folder(folder_path=str(tiny_phi3), repo_id="alice/tiny-phi3-weights")
    sets = ["model.name_or_path=alice/tiny-phi3-weights"]
    recipe = load_recipe(ROOT / RECIPE, sets)
    sizes = model_sizes(recipe)
    weights = (tiny_phi3 / "model.safetensors").stat().st_size
    assert sizes.stored_bytes == 4 and sizes.params * 4 <= weights <= sizes.params * 4 + 4096
    out = RunDir(tmp_path / "out", writer=False)
    before = disk.estimate(recipe, out, ["train", "export"], sizes, train_bytes=4, pairs=None)
    assert [(w.folder, w.need, w.parts) for w in before[:1]] == [(hub_env.cache_dir, sizes.params * 4, [f"the base model's download {disk.size_text(sizes.params * 4)}"])]
    assert before[1].folder == out.root
    # In a container with nothing mounted on the Hub cache (the mountinfo of one, in a file: no
    # container runs in `make test`), the download is said to go with the container; not refused.
    import logging

    container = tmp_path / "mountinfo"
    container.write_text("82 56 0:40 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("alignpress").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(disk, "MOUNTINFO", container)
            disk.check(recipe, out, ["train", "export"])
        need = disk.size_text(sizes.params * 4)
        assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == [
            f"the Hub cache {hub_env.cache_dir} is in this container's own filesystem (overlay at /): the base model's download {need} "
            "there goes with the container, and every `docker run` downloads it again; mount a host folder for it "
            "(docker run -v $HOME/.cache/huggingface:/cache/hf ...)"]
        records.clear()
        disk.check(recipe, out, ["train", "export"])  # this machine's own disk: nothing to say
        assert [r for r in records if r.levelno == logging.WARNING] == []
    finally:
        logging.getLogger("alignpress").removeHandler(handler)
    snapshot_download("alice/tiny-phi3-weights")
    assert [w.folder for w in disk.estimate(recipe, out, ["train", "export"], sizes, train_bytes=4, pairs=None)] == [out.root]

    # A Hub judge (eval.judge), which evaluate downloads after training: counted the same way.
    from alignpress.checks import judge_sizes
    from test_evaluate import build_judge

    folder = tmp_path / "judge"
    build_judge(folder)
    api.create_repo("alice/tiny-judge")
    api.upload_folder(folder_path=str(folder), repo_id="alice/tiny-judge")
    judged = load_recipe(ROOT / RECIPE, [*sets, "eval.judge=alice/tiny-judge"])
    judge = judge_sizes(judged)
    assert (judge.params, judge.stored_bytes) == (3 * 8 + 4 * 8 * 8 + 3 * 8 * 8 + 3 * 8 + 8, 4)  # embeddings, attention, MLP, norms, score
    [before] = disk.estimate(judged, out, ["evaluate"], sizes, train_bytes=4, pairs=None, judge=judge)
    assert (before.folder, before.need, before.parts) == (hub_env.cache_dir, judge.params * 4, [f"the judge's download {disk.size_text(judge.params * 4)}"])
    snapshot_download("alice/tiny-judge")
    assert disk.estimate(judged, out, ["evaluate"], sizes, train_bytes=4, pairs=None, judge=judge) == []
    assert judge_sizes(recipe) is None

    cache = tmp_path / "small-cache"
    if not _tmpfs(cache, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert weights > 64 << 10
        proc = run(tmp_path / "out2", "publish.repo_id=null", *sets, env={"HF_HUB_CACHE": str(cache)})
        line = refused(proc, tmp_path / "out2")
        need = disk.size_text(sizes.params * 4)
        free = disk.size_text(__import__("shutil").disk_usage(cache).free)
        assert line == (f"error: {tmp_path / 'out2'}: not enough disk space: train and export will write at least {need} to {cache} "
                        f"(the base model's download {need}) and its disk has {free} free; {DISK_FIX}")
        # Only the config, fetched by the model checks: no weights were downloaded.
        assert sorted(p.name for p in Path(cache).iterdir()) == [".locks", "CACHEDIR.TAG", "models--alice--tiny-phi3-weights"]
        assert [p.name for p in Path(cache).rglob("*") if p.is_file() and p.stat().st_size > 4096] == []
    finally:
        subprocess.run(["umount", str(cache)], check=False)


def test_a_card_license_other_than_the_bases_is_warned_about(hub_env, tiny_phi3, capsys):
    """A recipe copied from the Phi-3 one keeps `card.license: mit`: for a base whose card says
    apache-2.0, `validate --hub` (and run's preflight) says so; the Hub accepts either, so it is not refused."""
    from alignpress.cli import main

    api = hub_env.api()
    api.create_repo("alice/base-apache")
    api.upload_folder(folder_path=str(tiny_phi3), repo_id="alice/base-apache", ignore_patterns=["*.safetensors"])
    api.upload_file(path_or_fileobj=b"---\nlicense: apache-2.0\n---\n# base\n", path_in_repo="README.md", repo_id="alice/base-apache")
    args = ["validate", RECIPE, "--hub", "--set", "model.name_or_path=alice/base-apache", "--set", f"publish.repo_id={REPO}"]
    assert main([*args, "--set", "card.license=mit"]) == 0
    err = capsys.readouterr().err
    assert ("[alignpress] --set card.license: card.license is mit, but the base model's card says apache-2.0: a fine-tune keeps its "
            "base's license unless you mean otherwise; leave card.license unset to take the base's\n") in err
    assert main([*args, "--set", "card.license=apache-2.0"]) == 0
    assert "card.license is" not in capsys.readouterr().err


def test_a_finished_folder_that_will_publish_asks_the_hub_before_the_stages_run_again(hub_env, demo_copy):
    """The folder's publish stage is done (the demo pushes nothing): new flags that publish, with an eval
    change that redoes evaluate and export, used to skip the Hub check (publish was done) and meet
    the bad token only after those stages ran again."""
    ev = (demo_copy / "metrics/eval.json").read_bytes()
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", f"publish.repo_id={REPO}", "--set", "eval.max_rows=60",
               env={"HF_TOKEN": INVALID_TOKEN})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the Hub rejected the token while checking the token (whoami) (HTTP 401")
    assert "== evaluate" not in proc.stderr and (demo_copy / "metrics/eval.json").read_bytes() == ev
    assert [r.route for r in hub_env.server.requests] == ["whoami"]


def fine_grained(*scopes):
    return [{"entity": {"_id": "x", "type": kind, "name": name}, "permissions": perms} for kind, name, perms in scopes]


def test_a_fine_grained_token_without_repo_write_stops_before_prepare(hub_env, tmp_path):
    """Only a read-only *classic* token was refused: a fine-grained token without write access passed
    the preflight, trained, and was refused by the Hub at the push. Its scopes are in whoami."""
    read_only = "hf_aliceFineGrainedRead000000000000"
    hub_env.server.add_token(read_only, "alice", orgs={"acme": "write"}, role="fineGrained",
                             scoped=fine_grained(("user", "alice", ["repo.content.read"]), ("org", "acme", ["repo.write"])))
    out = tmp_path / "out"
    line = refused(run(out, env={"HF_TOKEN": read_only}), out)
    assert line == ("error: the fine-grained token of 'alice' may not write to alice/demo-dpo: give it \"Write access to contents/settings "
                    "of all repos\" under 'alice' (repo.write), or create a token with write access (https://huggingface.co/settings/tokens)")
    assert [r.route for r in hub_env.server.requests] == ["whoami"]


@pytest.mark.parametrize("scope", [("user", "alice"), ("model", REPO)])
def test_a_fine_grained_token_with_repo_write_publishes(hub_env, tmp_path, scope):
    """Its own namespace, or the one repo (when the repo exists): the preflight lets it through, and
    the test Hub, which checks the same scopes, takes the push."""
    from alignpress.hubnames import write_problem

    token = "hf_aliceFineGrainedWrite00000000000"
    scoped = fine_grained((*scope, ["repo.content.read", "repo.write"]))
    hub_env.server.add_token(token, "alice", role="fineGrained", scoped=scoped)
    me = {"name": "alice", "orgs": [], "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": scoped}}}}
    assert write_problem(me, [REPO]) is None
    assert write_problem(me, ["alice/other"]) == (None if scope[0] == "user" else ("token", write_problem(me, ["alice/other"])[1]))
    if scope[0] == "model":
        hub_env.server.add_repo(REPO, private=True)
    out = tmp_path / "out"
    sets = ["publish.allow_update=true"] if scope[0] == "model" else []
    proc = run(out, *sets, env={"HF_TOKEN": token})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["stages"]["publish"]["pushed"] is True
    # the run's summary says where it went, and that it is private
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("published model"))
    assert f"{hub_env.server.url}/{REPO} (tag " in row and row.endswith(", private)"), row


def test_a_tag_that_names_another_commit_stops_before_prepare(hub_env, tmp_path):
    """publish.tag set to a tag the repo already has: a model yet to be trained cannot be the one it
    names, and publish refused it after training and export."""
    repo = hub_env.server.add_repo(REPO, private=True, files={"notes.txt": b"v1\n"})
    repo.tags["v1"] = head = hub_env.server.head(REPO)
    out = tmp_path / "out"
    line = refused(run(out, "publish.allow_update=true", "publish.tag=v1"), out)
    assert line == (f"error: --set publish.tag: field 'publish.tag': the tag 'v1' of {REPO} already names a commit ({head[:8]}), and this "
                    "run's model is yet to be made: set publish.tag to a new name, or leave it unset (each run is then tagged with its run id)")
    proc = run(out, "publish.allow_update=true", "publish.tag=v2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub_env.server.tags(REPO)["v1"] == head and "v2" in hub_env.server.tags(REPO)
