"""The key of the stored reference log-probs (alignpress.refcache): TRL's weight hash, computed fast,
and the data half of the key, made from the token ids instead of the training settings.

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
from datasets import Dataset, load_from_disk
from transformers import Phi3Config, Phi3ForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer

from alignpress import refcache
from alignpress.refcache import StableKeyDPOTrainer, content_fingerprint, fast_weights_hash, weights_digest
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


ROWS = [{"prompt": [{"role": "user", "content": f"Question {i} ?" + " more" * i}], "chosen": [{"role": "assistant", "content": "Yes ."}], "rejected": [{"role": "assistant", "content": "No , never ."}]} for i in range(6)]


class Passes:
    """Counts the reference pass's batches (TRL's compute_ref_log_probs) of every trainer built."""

    def __init__(self, monkeypatch):
        self.batches = 0
        original = DPOTrainer.compute_ref_log_probs

        def counted(trainer, model, batch):
            self.batches += 1
            return original(trainer, model, batch)

        monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", counted)


def stored(tmp_path, rows, name="data"):
    """The data as `run` keeps it (train.training_dataset): saved, then loaded from disk, so TRL's
    caches land next to it."""
    Dataset.from_list(rows).save_to_disk(str(tmp_path / name))
    return str(tmp_path / name)


def build(cls, folder, tok, model=None, **settings):
    args = DPOConfig(**{"output_dir": "/tmp/alignpress-refcache-test", "per_device_train_batch_size": 2, "use_cpu": True, "report_to": "none",
                        "precompute_ref_log_probs": True, "max_length": 64, **settings})
    with fast_weights_hash():
        trainer = cls(model=model if model is not None else tiny_model(tok, torch.float32), args=args, train_dataset=load_from_disk(folder), processing_class=tok)
    return [round(x, 5) for x in trainer.train_dataset["ref_chosen_logps"]]


def test_stored_log_probs_survive_other_training_settings(tmp_path, monkeypatch):
    """A run resumed with other systems settings (a spot VM of another GPU type decides `auto`
    checkpointing again) reuses the stored pass: TRL's own key would change with any DPOConfig field."""
    tok = phi3_tokenizer()
    passes = Passes(monkeypatch)
    folder = stored(tmp_path, ROWS)
    first = build(StableKeyDPOTrainer, folder, tok)
    assert passes.batches == 3 and len(first) == 6  # 6 pairs, 2 a batch
    other = build(StableKeyDPOTrainer, folder, tok, activation_checkpointing=True, logging_steps=7, optim="adamw_torch", per_device_train_batch_size=3)
    assert passes.batches == 3 and other == first

    # what the log-probs depend on still counts: the truncation, the rows and their order, the weights
    cut = build(StableKeyDPOTrainer, folder, tok, max_length=24)  # the longer prompts are dropped, one pair cut
    assert cut == [*first[:2], -23.58518] and passes.batches == 5
    assert len(build(StableKeyDPOTrainer, folder, tok, truncation_mode="keep_end", max_length=24)) == 6 and passes.batches == 8
    turned = build(StableKeyDPOTrainer, stored(tmp_path, ROWS[::-1], "reversed"), tok)
    assert passes.batches == 11 and turned == first[::-1]
    changed = tiny_model(tok, torch.float32)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    build(StableKeyDPOTrainer, folder, tok, model=changed)
    assert passes.batches == 14


def test_trl_alone_keys_the_pass_by_its_settings(tmp_path, monkeypatch):
    """Why StableKeyDPOTrainer exists, pinned on the locked TRL: its DPOTrainer computes the pass again
    when only a training setting changed (its filter of over-long prompts holds the whole DPOConfig).
    If this starts failing, TRL keys by content itself and the subclass can go."""
    tok = phi3_tokenizer()
    passes = Passes(monkeypatch)
    folder = stored(tmp_path, ROWS)
    first = build(DPOTrainer, folder, tok)
    assert build(DPOTrainer, folder, tok, logging_steps=7) == first and passes.batches == 6


def test_content_fingerprint_reads_ids_in_order():
    ids = {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]], "rejected_ids": [[7], [8]]}
    base = content_fingerprint(Dataset.from_dict(ids), 32, "keep_start")
    assert len(base) == 16 and base == content_fingerprint(Dataset.from_dict({**ids, "length": [3, 2]}), 32, "keep_start")  # other columns: no
    moved = {**ids, "prompt_ids": [[1], [2, 3]]}  # the same tokens, cut elsewhere
    for other in (content_fingerprint(Dataset.from_dict(moved), 32, "keep_start"), content_fingerprint(Dataset.from_dict(ids), 31, "keep_start"),
                  content_fingerprint(Dataset.from_dict(ids), 32, "keep_end"), content_fingerprint(Dataset.from_dict({k: v[::-1] for k, v in ids.items()}), 32, "keep_start")):
        assert other != base
    for column in ("chosen_ids", "rejected_ids"):  # only one answer column changed (a fixed dataset): other log-probs
        assert content_fingerprint(Dataset.from_dict({**ids, column: [[7], [9]] if column == "rejected_ids" else [[4], [5, 9]]}), 32, "keep_start") != base
    big = Dataset.from_dict({k: [v[i % 2] for i in range(3000)] for k, v in ids.items()})  # several arrow batches
    assert content_fingerprint(big, 32, "keep_start") == content_fingerprint(Dataset.from_dict(big.to_dict()), 32, "keep_start")
