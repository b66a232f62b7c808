"""Shared fixtures: tiny model folders built here, and one finished demo run per test session."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

pytest_plugins = ["conftest_hub"]

# Several pytest workers share the machine's cores. torch's default, one thread per core in every
# process, makes each worker's job processes fight for them (OpenMP threads spin while they wait):
# tests/test_demo.py and test_preflight.py on 2 workers, 2 cores took 296 s so, 216 s with one
# thread each. Each worker's processes get their share instead, unless the user set a number.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))


@pytest.fixture(scope="session", autouse=True)
def alignpress_home(tmp_path_factory):
    """Builtin models are built once per session into a temporary ALIGNPRESS_HOME."""
    home = os.environ.get("ALIGNPRESS_TEST_HOME") or str(tmp_path_factory.mktemp("alignpress-home"))
    os.environ["ALIGNPRESS_HOME"] = home
    # Nothing here may reach the Hub: fail fast instead of waiting on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The suite's runs write under /tmp: in a container with nothing mounted there the job would refuse
    # them (disk.check_container_outputs; tests/test_lostwork.py and test_container.py check that).
    os.environ.setdefault("ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS", "1")
    return Path(home)


def cli(*args, env=None, timeout=600, cwd=ROOT):
    """Run entrypoint.py as a user would; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def _save_tiny(folder: Path, kind: str, with_template: bool = True) -> Path:
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM

    from alignpress.tiny import gemma_tokenizer, phi3_tokenizer

    torch.manual_seed(0)
    tok = phi3_tokenizer() if kind == "phi3" else gemma_tokenizer()
    if kind == "phi3":
        cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = Phi3ForCausalLM(cfg)
    else:
        cfg = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GemmaForCausalLM(cfg)
    if not with_template:
        tok.chat_template = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not with_template:
        for name in ("chat_template.jinja",):
            (folder / name).unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-phi3"), "phi3")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-gemma"), "gemma")


@pytest.fixture(scope="session")
def tiny_no_template(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-notemplate"), "phi3", with_template=False)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, alignpress_home):
    """The README's demo, run once through the real entry point; tests copy it, never change it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture
def demo_copy(demo_run, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(demo_run[0], out)
    return out
