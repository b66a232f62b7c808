"""Pytest fixtures for the Hub test server (``tests/hubserver.py``), as a plugin module.

Register with ``pytest_plugins = ["conftest_hub"]`` in ``tests/conftest.py``.

* ``hub_server``: a fresh ``HubServer`` on 127.0.0.1 (random port) per test, stopped after it.
* ``hub_env``: ``hub_server`` plus a process environment pointing the real client at it:
  ``HF_ENDPOINT``, ``HF_TOKEN`` (the test user's write token), ``HF_HUB_DISABLE_TELEMETRY=1``,
  ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_XET_CACHE`` in a tmp dir, offline mode off.

Why env vars are not enough: ``huggingface_hub.constants`` reads ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``... once, at import
(constants.py:69 ``ENDPOINT = os.getenv("HF_ENDPOINT", ...)``, :70 the derived
``HUGGINGFACE_CO_URL_TEMPLATE``, :177 ``HF_HUB_CACHE``, :194 ``HF_HUB_OFFLINE``), and the
library is imported long before a fixture runs. The client reads those *module attributes*
at call time (``HfApi.__init__`` uses ``constants.ENDPOINT`` when no endpoint is given,
``hf_hub_download`` uses ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and
``constants.HF_HUB_CACHE``), so ``hub_env`` monkeypatches the attributes as well as the env
vars (the env vars serve subprocesses). Code under test should still get ``endpoint=``
passed explicitly where it can (``HfApi(endpoint=hub_env.endpoint)``). The token is read
from ``os.environ["HF_TOKEN"]`` at call time (utils/_auth.py:149), so the env var suffices.

Xet vs LFS: ``is_xet_available()`` (utils/_runtime.py:157) checks the module attribute
``constants.HF_HUB_DISABLE_XET`` at call time, so ``hub_env.use_lfs()`` (monkeypatching it
to True) switches this process to the git-LFS upload path and plain HTTP downloads; the
default is Xet (hf_xet is installed).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hubserver import OTHER_TOKEN, READ_TOKEN, TEST_ORG, TEST_TOKEN, TEST_USER, HubServer  # noqa: E402


@dataclass
class HubEnv:
    """What ``hub_env`` yields."""

    server: HubServer
    endpoint: str  # == server.url, also in HF_ENDPOINT
    token: str  # write token of ``user`` (also in HF_TOKEN)
    user: str  # "alice"
    org: str  # an org ``user`` can write to
    read_token: str  # read-only token of ``user``
    other_token: str  # write token of "bob", who cannot write to alice's namespaces
    hf_home: Path
    cache_dir: Path  # HF_HUB_CACHE
    monkeypatch: pytest.MonkeyPatch

    def api(self, token: str | None = None):
        """An ``HfApi`` bound to the server explicitly (``endpoint=``), with ``token`` or the test token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token or self.token)

    def use_lfs(self) -> None:
        """Make this process upload through git-LFS (not Xet) and download over plain HTTP."""
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        self.monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """A fresh Hub server (function-scoped); its Xet CAS lives in a tmp dir."""
    server = HubServer(cas_dir=tmp_path_factory.mktemp("hub-cas"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """``hub_server`` + env vars and ``huggingface_hub.constants`` pointing the client at it."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    endpoint = hub_server.url

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(home / "xet"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # Import-time constants (see module docstring).
    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_XET": False,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    if hasattr(constants, "HF_URL_HOSTS"):  # hosts whose URLs parse as Hub URLs (utils/_hf_uris.py)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    # transformers keeps one HfApi per process (transformers.utils.hub.hf_api), bound to the endpoint
    # of the server it first met: a tokenizer loaded in-process in a later test asked the previous,
    # stopped server for its file list and retried with backoff for 90 s before giving up.
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None, raising=False)

    yield HubEnv(
        server=hub_server,
        endpoint=endpoint,
        token=TEST_TOKEN,
        user=TEST_USER,
        org=TEST_ORG,
        read_token=READ_TOKEN,
        other_token=OTHER_TOKEN,
        hf_home=home,
        cache_dir=cache,
        monkeypatch=monkeypatch,
    )
