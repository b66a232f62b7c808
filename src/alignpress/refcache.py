"""The key under which TRL stores precomputed reference log-probs, computed fast.

TRL 1.16's DPOTrainer keys its cache of precomputed reference log-probs (the Arrow files that
`train.training_dataset` keeps in the output folder) by a SHA-256 of every weight of the reference
model, `trl.trainer.utils.hash_module`, computed whenever a trainer is built with
`precompute_ref_log_probs`, a resumed run's included. It converts each bf16 tensor to float32,
copies it into a Python bytes object and hashes it in one thread: 31.9 s for a Phi-3-mini-sized
model (3.8 B parameters) on 2 CPU cores, paid in GPU time on every start. `weights_digest` hashes
the same content (every tensor's name, dtype, shape and raw bytes, so any changed bit changes it)
without the conversion and copy, tensors in parallel threads (hashlib releases the GIL): 2.5 s for
the same model on the same machine, 12.5x faster (benchmarks/bench_hash.py prints both).

There is no TRL option for the key, so `fast_weights_hash` swaps the function DPOTrainer calls for
the time of the trainer's construction, and restores it after. Its keys differ from TRL's, so a
cache written with TRL's own hash is computed once more, never reused wrongly.

The other half of TRL's key is the fingerprint of its tokenised dataset, which the `datasets`
library derives from every transform and its arguments. One of TRL's transforms (dropping pairs
whose prompt fills max_length) is a lambda that holds the whole DPOConfig, so any training setting
changes the key: gradient checkpointing, Liger, the logging interval. A preempted spot run that
resumes on another GPU type (the sky/ tasks allow several) decides `auto` checkpointing anew and
computed the whole pass again: up to 11 minutes of GPU time for the Phi-3 recipe's data (2,200
pairs of about 1,680 tokens at the 5,456 tokens/s measured for the pass).
`StableKeyDPOTrainer` keys the pass by what the log-probs depend on instead: the token ids in row
order and the collator's truncation (`content_fingerprint`), with the weights digest as before.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from datasets import Dataset
from trl import DPOTrainer

THREADS = 8


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.sha256(raw.data).digest()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict: names, dtypes, shapes and each tensor's own digest."""
    items = sorted(module.state_dict().items())
    with ThreadPoolExecutor(max_workers=max(1, min(THREADS, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda item: _tensor_digest(item[1]), items))
    h = hashlib.sha256()
    for (name, tensor), digest in zip(items, digests):
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(digest)
    return h.hexdigest()


@contextmanager
def fast_weights_hash() -> Iterator[dict[str, Any]]:
    """While a DPOTrainer is built: its weight hash is `weights_digest`. Yields a dict that gets
    `hash_s` (seconds spent hashing) when the trainer hashed. Where TRL no longer has the function
    (another version), nothing is swapped and TRL hashes as it does (tests/test_refcache.py fails
    on the pinned version if the name goes)."""
    from trl.trainer import dpo_trainer

    timing: dict[str, Any] = {}
    original = getattr(dpo_trainer, "hash_module", None)
    if original is None:
        yield timing
        return

    def timed(module):
        started = time.perf_counter()
        try:
            return weights_digest(module)
        finally:
            timing["hash_s"] = round(timing.get("hash_s", 0.0) + time.perf_counter() - started, 2)

    dpo_trainer.hash_module = timed
    try:
        yield timing
    finally:
        dpo_trainer.hash_module = original


def content_fingerprint(dataset, max_length: int | None, truncation_mode: str) -> str:
    """What a reference pass over TRL's tokenised dataset reads: each row's prompt, chosen and
    rejected token ids, in row order (the stored log-probs are matched to rows by position), and how
    the collator truncates them. Batching, padding and the training settings are left out: they
    change the rounding, not what is computed."""
    import numpy as np
    import pyarrow.compute as pc

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    hashers = {(c, part): hashlib.sha256() for c in columns for part in ("lengths", "values")}
    for table in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=1024):
        for c in columns:
            col = table.column(c)
            hashers[c, "lengths"].update(np.asarray(pc.list_value_length(col), dtype=np.int64).tobytes())
            hashers[c, "values"].update(np.asarray(pc.list_flatten(col), dtype=np.int64).tobytes())
    h = hashlib.sha256(f"alignpress-ref-logps/1\0{max_length}\0{truncation_mode}\0{len(dataset)}\0".encode())
    for key in sorted(hashers):
        h.update(hashers[key].digest())
    return h.hexdigest()[:16]


class StableKeyDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose precomputed reference log-probs are stored under a key that only their
    inputs make (content_fingerprint, then TRL's hash of the weights): a run resumed with other
    systems settings, on another GPU, reuses them. `ref_batches_computed` counts the reference
    batches run (after construction: 0 when the stored pass was reused)."""

    ref_batches_computed = 0

    def compute_ref_log_probs(self, model, inputs):
        self.ref_batches_computed += 1
        return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if isinstance(dataset, Dataset) and all(c in dataset.column_names for c in ("prompt_ids", "chosen_ids", "rejected_ids")):
            # TRL keys the pass by (dataset._fingerprint, weights hash) and names its cache file after that.
            dataset._fingerprint = content_fingerprint(dataset, self.args.max_length, self.args.truncation_mode)
        return super()._precompute_ref_logps(dataset, name, batch_size)
