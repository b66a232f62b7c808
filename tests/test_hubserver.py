"""The real ``huggingface_hub`` client against the test Hub server (tests/hubserver.py).

Every test drives the installed client (``HfApi(endpoint=server.url, ...)``, ``hf_hub_download``)
over HTTP on 127.0.0.1, then checks both what the client reports and what the server stored.

Xet vs LFS in one process: ``constants.HF_HUB_DISABLE_XET`` is read from the environment at
import time (huggingface_hub/constants.py:343), but ``is_xet_available()``
(utils/_runtime.py:157) and the download path (file_download.py:2015) read the module
attribute at call time, so ``hub_env.use_lfs()`` monkeypatching that attribute is enough; no
subprocess is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import types
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import _http as hf_http

from hubserver import GITATTRIBUTES, INVALID_TOKEN, OTHER_TOKEN, TEST_TOKEN, git_blob_oid

README = b"""---
license: apache-2.0
base_model: Qwen/Qwen2.5-0.5B-Instruct
tags:
- dpo
- alignpress
---

# alignpress test model
"""
CONFIG = json.dumps({"model_type": "qwen2", "hidden_size": 64}, indent=2).encode()
WEIGHTS = random.Random(1234).randbytes(2 * 1024 * 1024)  # ~2 MB, incompressible
FILES = {"README.md": README, "config.json": CONFIG, "model.safetensors": WEIGHTS}
EXPECTED_SIZES = {".gitattributes": len(GITATTRIBUTES), **{name: len(data) for name, data in FILES.items()}}


def write_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    return root


def status_of(excinfo: pytest.ExceptionInfo) -> int:
    return excinfo.value.response.status_code


def check_uploaded_repo(api: HfApi, server, repo_id: str) -> dict:
    """Listing, sizes and hashes seen by the client and stored by the server; returns the tree."""
    assert api.list_repo_files(repo_id) == sorted(EXPECTED_SIZES)
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    assert {path: entry.size for path, entry in tree.items()} == EXPECTED_SIZES
    assert server.files(repo_id) == EXPECTED_SIZES
    siblings = api.model_info(repo_id, files_metadata=True).siblings
    assert {s.rfilename: s.size for s in siblings} == EXPECTED_SIZES
    # regular files: git blob oid, no LFS info; the binary: LFS with its sha256
    assert tree["README.md"].lfs is None
    assert tree["README.md"].blob_id == git_blob_oid(README)
    assert tree["config.json"].lfs is None
    weights = tree["model.safetensors"]
    assert weights.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert weights.lfs.size == len(WEIGHTS)
    for name, data in FILES.items():
        assert server.file_bytes(repo_id, name) == data
    return tree


# --------------------------------------------------------------------------- identity and repos


def test_whoami(hub_env):
    me = hub_env.api().whoami()
    assert me["name"] == "alice"
    assert [(org["name"], org["roleInOrg"]) for org in me["orgs"]] == [("alignpress-test", "write")]
    assert me["auth"]["accessToken"]["role"] == "write"
    [record] = hub_env.server.requests
    assert (record.method, record.path, record.status, record.user) == ("GET", "/api/whoami-v2", 200, "alice")
    assert "authorization" not in record.headers  # the log never keeps the token


def test_create_private_repo_conflict_and_exist_ok(hub_env):
    api, server = hub_env.api(), hub_env.server
    url = api.create_repo("alice/private-model", private=True)
    assert url.repo_id == "alice/private-model"
    assert str(url) == f"{hub_env.endpoint}/alice/private-model"
    assert api.repo_info("alice/private-model").private is True
    assert server.is_private("alice/private-model") is True

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("alice/private-model", private=True)
    assert status_of(excinfo) == 409

    # exist_ok=True swallows the 409 -- and silently ignores private=False (Hub behaviour):
    assert api.create_repo("alice/private-model", private=False, exist_ok=True).repo_id == "alice/private-model"
    assert api.repo_info("alice/private-model").private is True

    # a public repo in an org alice can write to; a fresh repo holds the "initial commit"
    api.create_repo(f"{hub_env.org}/public-model", private=False)
    assert api.repo_info(f"{hub_env.org}/public-model").private is False
    assert api.list_repo_files(f"{hub_env.org}/public-model") == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits(f"{hub_env.org}/public-model")] == ["initial commit"]
    assert server.repo_ids() == ["alice/private-model", f"{hub_env.org}/public-model"]
    assert [r.status for r in server.requests_to("create_repo")] == [200, 409, 409, 200]


def test_auth_errors(hub_env):
    endpoint, server = hub_env.endpoint, hub_env.server
    bad = HfApi(endpoint=endpoint, token=INVALID_TOKEN)
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.whoami()
    assert status_of(excinfo) == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.create_repo("alice/nope")
    assert status_of(excinfo) == 401
    with pytest.raises(HfHubHTTPError) as excinfo:  # anonymous write
        HfApi(endpoint=endpoint, token=False).create_repo("alice/nope")
    assert status_of(excinfo) == 401
    with pytest.raises(HfHubHTTPError) as excinfo:  # read-only token
        hub_env.api(hub_env.read_token).create_repo("alice/nope")
    assert status_of(excinfo) == 403
    with pytest.raises(HfHubHTTPError) as excinfo:  # bob in alice's namespace
        HfApi(endpoint=endpoint, token=OTHER_TOKEN).create_repo("alice/nope")
    assert status_of(excinfo) == 403
    assert server.repo_ids() == []

    hub_env.api().create_repo("alice/public", private=False)
    with pytest.raises(HfHubHTTPError) as excinfo:  # bob writing to alice's public repo
        HfApi(endpoint=endpoint, token=OTHER_TOKEN).upload_file(
            path_or_fileobj=b"{}", path_in_repo="x.json", repo_id="alice/public"
        )
    assert status_of(excinfo) == 403
    assert server.requests_to("commit") == []
    assert server.files("alice/public") == {".gitattributes": len(GITATTRIBUTES)}


def test_precreated_repos_visibility_and_anonymous_download(hub_server, tmp_path):
    weights = bytes(range(256)) * 16
    hub_server.add_repo("alice/open-model", files={"config.json": CONFIG, "weights.bin": weights})
    hub_server.add_repo("alice/secret", private=True)
    anonymous = HfApi(endpoint=hub_server.url, token=False)

    assert anonymous.list_repo_files("alice/open-model") == [".gitattributes", "config.json", "weights.bin"]
    tree = {e.path: e for e in anonymous.list_repo_tree("alice/open-model")}
    assert tree["weights.bin"].lfs.sha256 == hashlib.sha256(weights).hexdigest()  # *.bin -> LFS
    assert tree["config.json"].lfs is None
    path = hf_hub_download(
        "alice/open-model", "weights.bin", endpoint=hub_server.url, token=False, cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == weights

    with pytest.raises(RepositoryNotFoundError):
        anonymous.repo_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=OTHER_TOKEN).repo_info("alice/secret")
    assert HfApi(endpoint=hub_server.url, token=TEST_TOKEN).repo_info("alice/secret").private is True


# --------------------------------------------------------------------------- uploads and downloads


def test_upload_folder_lfs_path(hub_env, tmp_path):
    hub_env.use_lfs()
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/lfs-model"
    api.create_repo(repo_id, private=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=write_folder(tmp_path / "out"), commit_message="Upload model")

    assert info.oid == server.head(repo_id)
    assert [c.title for c in server.commits(repo_id)] == ["initial commit", "Upload model"]
    # git-LFS transport: one batch call, one PUT of the binary, no Xet
    assert len(server.requests_to("lfs_batch")) == 1
    assert [r.body_size for r in server.requests_to("lfs_put")] == [len(WEIGHTS)]
    assert len(server.requests_to("lfs_verify")) == 1
    assert server.requests_to("xet_token") == []
    assert len(server.requests_to("commit")) == 1

    tree = check_uploaded_repo(api, server, repo_id)
    assert tree["model.safetensors"].xet_hash is None

    for name in ("README.md", "model.safetensors"):
        path = hf_hub_download(repo_id, name, endpoint=hub_env.endpoint, token=hub_env.token, cache_dir=tmp_path / "dl")
        assert Path(path).read_bytes() == FILES[name]
    assert [r.method for r in server.requests_to("resolve", path_regex="model.safetensors$")] == ["HEAD", "GET"]

    # the token was uploaded nowhere (positive control: a README word is found)
    assert server.find_bytes(hub_env.token) == []
    assert server.find_bytes("alignpress test model") == [f"model:{repo_id}@{info.oid[:8]}:README.md"]
    assert all("authorization" not in r.headers for r in server.requests)


def test_upload_folder_xet_path(hub_env, tmp_path):
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/xet-model"
    api.create_repo(repo_id, private=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=write_folder(tmp_path / "out"), commit_message="Upload model")

    assert info.oid == server.head(repo_id)
    assert [c.title for c in server.commits(repo_id)] == ["initial commit", "Upload model"]
    # Xet transport: a write token (casUrl local://...), no LFS calls; hf_xet wrote the CAS
    assert [r.path for r in server.requests_to("xet_token")] == [f"/api/models/{repo_id}/xet-write-token/main"]
    assert server.requests_to("lfs_batch") == [] and server.requests_to("lfs_put") == []
    assert list(server.cas_dir.rglob("*.mdb"))

    tree = check_uploaded_repo(api, server, repo_id)
    xet_hash = server.file_entries(repo_id)["model.safetensors"].xet_hash
    assert xet_hash is not None and len(xet_hash) == 64
    assert tree["model.safetensors"].xet_hash == xet_hash

    # download with hf_xet: HEAD advertises X-Xet-Hash, the bytes come from the local CAS
    server.clear_requests()
    for name in ("README.md", "model.safetensors"):
        path = hf_hub_download(repo_id, name, endpoint=hub_env.endpoint, token=hub_env.token, cache_dir=tmp_path / "dl")
        assert Path(path).read_bytes() == FILES[name]
    assert [r.method for r in server.requests_to("resolve", path_regex="model.safetensors$")] == ["HEAD"]
    assert [r.path for r in server.requests_to("xet_token")] == [f"/api/models/{repo_id}/xet-read-token/{info.oid}"]

    # download over plain HTTP (client without Xet): the server rebuilds the bytes from the CAS
    hub_env.use_lfs()
    path = hf_hub_download(
        repo_id, "model.safetensors", endpoint=hub_env.endpoint, token=hub_env.token, cache_dir=tmp_path / "dl2"
    )
    assert Path(path).read_bytes() == WEIGHTS
    assert [r.method for r in server.requests_to("resolve", path_regex="model.safetensors$")] == ["HEAD", "HEAD", "GET"]
    assert server.find_bytes(hub_env.token) == []


def test_readme_with_broken_yaml_is_refused_before_upload(hub_env, tmp_path):
    api, server = hub_env.api(), hub_env.server
    api.create_repo("alice/bad-card")
    folder = write_folder(tmp_path / "out")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n\tbroken\n# no closing marker\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_folder(repo_id="alice/bad-card", folder_path=folder)
    assert server.requests_to("preupload") == [] and server.requests_to("commit") == []
    assert len(server.commits("alice/bad-card")) == 1


def test_tags_branches_and_commits(hub_env, tmp_path):
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/tagged"
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=repo_id, commit_message="v1")

    api.create_tag(repo_id, tag="v1.0", tag_message="first release")
    refs = api.list_repo_refs(repo_id)
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", first.oid)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", first.oid)]
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_tag(repo_id, tag="v1.0")
    assert status_of(excinfo) == 409
    api.create_tag(repo_id, tag="v1.0", exist_ok=True)
    assert server.tags(repo_id) == {"v1.0": first.oid}

    # an adapter pushed to a branch leaves main untouched
    api.create_branch(repo_id, branch="adapter")
    adapter = api.upload_file(
        path_or_fileobj=b'{"r": 8}', path_in_repo="adapter_config.json", repo_id=repo_id, revision="adapter"
    )
    assert server.branches(repo_id) == {"main": first.oid, "adapter": adapter.oid}
    assert sorted(server.files(repo_id, "adapter")) == [".gitattributes", "adapter_config.json", "config.json"]
    assert sorted(server.files(repo_id, "main")) == [".gitattributes", "config.json"]
    assert [c.title for c in api.list_repo_commits(repo_id, revision="adapter")] == [
        "Upload adapter_config.json with huggingface_hub",
        "v1",
        "initial commit",
    ]
    assert len(api.list_repo_commits(repo_id)) == 2

    # downloads by tag and by branch
    path = hf_hub_download(repo_id, "config.json", revision="v1.0", endpoint=hub_env.endpoint, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == CONFIG
    path = hf_hub_download(
        repo_id, "adapter_config.json", revision="adapter", endpoint=hub_env.endpoint, cache_dir=tmp_path / "c"
    )
    assert Path(path).read_bytes() == b'{"r": 8}'


def test_hub_env_points_default_client_at_server(hub_env):
    # no endpoint/token/cache_dir passed: the patched constants and HF_TOKEN do the work
    assert os.environ["HF_ENDPOINT"] == hub_env.endpoint
    api = HfApi()
    assert api.endpoint == hub_env.endpoint
    assert api.whoami()["name"] == "alice"
    api.create_repo("alice/env-model")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id="alice/env-model")
    path = Path(hf_hub_download("alice/env-model", "hello.txt"))
    assert path.read_bytes() == b"hello"
    assert path.is_relative_to(hub_env.cache_dir)


# --------------------------------------------------------------------------- faults


def test_429_is_retried_then_succeeds(hub_env):
    api, server = hub_env.api(), hub_env.server
    api.create_repo("alice/rate-limited")
    fault = server.inject("POST", r"/preupload/", 429, times=1)
    api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id="alice/rate-limited")
    assert fault.hits == 1
    assert [r.status for r in server.requests_to("preupload")] == [429, 200]
    assert server.requests_to("preupload")[0].fault == "inject"
    assert server.file_bytes("alice/rate-limited", "config.json") == CONFIG


def test_persistent_5xx_is_an_error(hub_env, monkeypatch):
    api, server = hub_env.api(), hub_env.server
    # create_repo posts once (no retry): the 503 surfaces at once
    server.inject("POST", r"^/api/repos/create$", 503, times=None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("alice/down")
    assert status_of(excinfo) == 503
    assert [r.status for r in server.requests_to("create_repo")] == [503]
    assert server.repo_ids() == []
    server.clear_faults()

    # preupload goes through http_backoff: 1 try + 5 retries, sleeping 1, 2, 4, 8, 8 s
    # (sleeps recorded instead of slept).
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    api.create_repo("alice/flaky")
    server.inject("POST", r"/preupload/", 500, times=None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id="alice/flaky")
    assert status_of(excinfo) == 500
    assert [r.status for r in server.requests_to("preupload")] == [500] * 6
    assert sleeps == [1, 2, 4, 8, 8]
    assert server.requests_to("commit") == []
    assert len(server.commits("alice/flaky")) == 1


def test_interrupted_lfs_put_is_retried_by_the_client(hub_env, tmp_path):
    hub_env.use_lfs()
    api, server = hub_env.api(), hub_env.server
    api.create_repo("alice/cut-upload")
    fault = server.interrupt("PUT", r"^/_lfs/", after_bytes=64 * 1024)
    api.upload_folder(repo_id="alice/cut-upload", folder_path=write_folder(tmp_path / "out"))
    assert fault.hits == 1
    assert [(r.status, r.body_size) for r in server.requests_to("lfs_put")] == [(None, 64 * 1024), (200, len(WEIGHTS))]
    assert server.file_bytes("alice/cut-upload", "model.safetensors") == WEIGHTS
    assert len(server.commits("alice/cut-upload")) == 2


def test_interrupted_commit_then_rerun(hub_env, tmp_path):
    hub_env.use_lfs()
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/rerun"
    api.create_repo(repo_id)
    folder = write_folder(tmp_path / "out")
    server.interrupt("POST", r"/commit/")  # connection dropped before the commit is made
    with pytest.raises(httpx2.TransportError):  # create_commit does not retry the commit POST
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model")
    assert [c.title for c in server.commits(repo_id)] == ["initial commit"]
    assert len(server.requests_to("lfs_put")) == 1  # the blob did reach the server

    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model")
    assert len(server.requests_to("lfs_put")) == 1  # batch answered "already stored": no second PUT
    assert [c.title for c in server.commits(repo_id)] == ["initial commit", "Upload model"]
    assert info.oid == server.head(repo_id)
    assert server.file_bytes(repo_id, "model.safetensors") == WEIGHTS


def test_lost_commit_response_then_rerun_makes_no_duplicate(hub_env, tmp_path):
    hub_env.use_lfs()
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/lost-response"
    api.create_repo(repo_id)
    folder = write_folder(tmp_path / "out")
    server.interrupt("POST", r"/commit/", process=True)  # the commit is made, its answer lost
    with pytest.raises(httpx2.TransportError):
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model")
    assert [c.title for c in server.commits(repo_id)] == ["initial commit", "Upload model"]

    # re-run: preupload reports the remote oids, every file is unchanged -> no commit at all
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model")
    assert info.oid == server.head(repo_id)
    assert len(server.commits(repo_id)) == 2
    assert len(server.requests_to("commit")) == 1


def test_xet_commit_post_is_retried_after_lost_response(hub_env, tmp_path):
    # With Xet, upload_folder runs _upload_pipeline, whose commit POST *is* retried
    # (_send_commit(retry_on_error=True)): a lost answer yields a second, identical commit.
    api, server = hub_env.api(), hub_env.server
    repo_id = "alice/xet-retry"
    api.create_repo(repo_id)
    fault = server.interrupt("POST", r"/commit/", process=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=write_folder(tmp_path / "out"), commit_message="Upload")
    assert fault.hits == 1
    assert [r.status for r in server.requests_to("commit")] == [None, 200]
    history = server.commits(repo_id)
    assert [c.title for c in history] == ["initial commit", "Upload", "Upload"]
    assert history[1].files == history[2].files
    assert info.oid == history[2].oid
