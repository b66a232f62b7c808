"""The key of the stored reference log-probs (alignpress.refcache): TRL's weight hash, computed fast.

The digest must change with any weight bit, name, dtype or shape, and stay the same for the same
weights; the swap must hold only while a trainer is built, with the pinned TRL's real DPOTrainer.
Speed is a benchmark (benchmarks/bench_hash.py), not a timed test; the smoke of it runs here.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from datasets import Dataset
from transformers import Phi3Config, Phi3ForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer

from alignpress import refcache
from alignpress.refcache import fast_weights_hash, weights_digest
from alignpress.tiny import phi3_tokenizer


def tiny_model(tok, dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    return Phi3ForCausalLM(config).to(dtype)


def test_the_digest_follows_every_bit_name_dtype_and_shape(monkeypatch):
    tok = phi3_tokenizer()
    model = tiny_model(tok)
    digest = weights_digest(model)
    assert len(digest) == 64 and weights_digest(copy.deepcopy(model)) == digest
    monkeypatch.setattr(refcache, "THREADS", 1)  # the threads change the order of work, not the result
    assert weights_digest(model) == digest

    changed = copy.deepcopy(model)
    with torch.no_grad():
        w = changed.model.layers[1].mlp.down_proj.weight
        w.view(torch.int16).view(-1)[5] ^= 1  # the lowest bit of one bf16 weight
    assert weights_digest(changed) != digest

    # the same bytes under another dtype, another shape, another name
    same = {"a": torch.arange(8, dtype=torch.int16).view(torch.bfloat16)}
    base = weights_digest(torch.nn.ParameterDict({k: torch.nn.Parameter(v, requires_grad=False) for k, v in same.items()}))
    for other in ({"a": same["a"].view(torch.float16)}, {"a": same["a"].view(2, 4)}, {"b": same["a"]}):
        assert weights_digest(torch.nn.ParameterDict({k: torch.nn.Parameter(v, requires_grad=False) for k, v in other.items()})) != base


def test_the_pinned_trl_hashes_through_the_name_that_is_swapped():
    """If TRL renames its hash function, fast_weights_hash swaps nothing (slow, still right): this says so."""
    from trl.trainer.utils import hash_module

    assert dpo_trainer.hash_module is hash_module


def test_a_trainer_built_inside_keys_its_cache_by_the_digest(tmp_path, monkeypatch):
    """A real DPOTrainer with precomputed reference log-probs: TRL's own hash is not called inside the
    block, the trainer's cache key is the digest of its weights, and TRL's function is back after."""
    original = dpo_trainer.hash_module
    calls = []
    monkeypatch.setattr(dpo_trainer, "hash_module", lambda module: calls.append(module) or original(module))
    tok = phi3_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"Question {i} ?"}], "chosen": [{"role": "assistant", "content": "Yes ."}], "rejected": [{"role": "assistant", "content": "No , never ."}]} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none", precompute_ref_log_probs=True, max_length=32)
    model = tiny_model(tok, torch.float32)
    expected = weights_digest(model)
    with fast_weights_hash() as timing:
        assert dpo_trainer.hash_module is not original
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert calls == [] and trainer._precompute_model_hash == expected
    assert isinstance(timing["hash_s"], float) and timing["hash_s"] >= 0
    assert len(trainer.train_dataset["ref_chosen_logps"]) == 4
    assert dpo_trainer.hash_module is not original and dpo_trainer.hash_module(model) == original(model)  # the test's spy is back
    assert len(calls) == 1

    # restored after an error too
    with pytest.raises(RuntimeError), fast_weights_hash():
        raise RuntimeError("trainer failed")
    assert dpo_trainer.hash_module(model) == original(model) and len(calls) == 2


def test_bench_hash_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_hash.py"), "--model", "tiny"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "tiny" and out["params"] == 147776 and out["one_weight_changes_digest"] is True
    assert out["weights_digest_s"] >= 0 and out["trl_hash_module_s"] >= 0
