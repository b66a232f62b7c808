"""Several training processes (accelerate launch, torchrun): the main process decides, the others follow.

On several nodes each one mounts the output bucket through its own cache (SkyPilot's MOUNT_CACHED):
what the main process writes there reaches the other nodes seconds later, or after the upload. So the
other processes never read the output folder for what the main process decided or wrote (stage
statuses, the prepared pairs, the checkpoint to resume, the speed levers): it is sent to them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .errors import AlignpressError


# Variable-length batches (every micro-batch pads to its own longest row) fragment PyTorch's CUDA
# caching allocator: in the measured runs it reserved 4% to 58% more than it allocated
# (benchmarks/results/2026-11-27-h200/). Expandable segments let it grow a block in place instead,
# PyTorch's advice for this case (docs: CUDA memory management).
ALLOCATOR_SETTING = "expandable_segments:True"


def cuda_allocator_setting() -> str | None:
    """The allocator setting this process runs with, as NAME=value; None: PyTorch's default."""
    return next((f"{k}={os.environ[k]}" for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF") if k in os.environ), None)


def configure_cuda_allocator() -> str:
    """Set PYTORCH_ALLOC_CONF for this process and its children unless the user set it (or the
    older PYTORCH_CUDA_ALLOC_CONF); call it before torch allocates anything. Returns the setting."""
    if cuda_allocator_setting() is None:
        os.environ["PYTORCH_ALLOC_CONF"] = ALLOCATOR_SETTING
    return cuda_allocator_setting()


def several() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def several_nodes() -> bool:
    """More processes than this node runs: torchrun and accelerate set LOCAL_WORLD_SIZE per node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def state():
    """accelerate's process state under `accelerate launch`/torchrun; None for a single process."""
    if not several():
        return None
    import torch
    from accelerate import PartialState

    # Without cpu=True a CPU-only launch (gloo) is seen as one process and every rank thinks it is the main one.
    return PartialState(cpu=not torch.cuda.is_available(), timeout=trainer_timeout())


def trainer_timeout():
    """How long a collective may wait: the Trainer's own default (TrainingArguments.ddp_timeout,
    30 minutes). The Trainer would have set it, but the process group exists before the Trainer
    does, and without it NCCL's default is 10 minutes (PyTorch's ProcessGroupNCCL): the other
    processes, waiting for the main one's prepare of a large dataset, would be killed by NCCL's
    watchdog after 10 minutes. (On the CPU, gloo's default is the same 30 minutes.)"""
    from dataclasses import fields
    from datetime import timedelta

    from transformers import TrainingArguments

    return timedelta(seconds=next(f.default for f in fields(TrainingArguments) if f.name == "ddp_timeout"))


def leave(st) -> None:
    """After a successful command, or a `run`'s training: every process waits for the others, then
    leaves the process group (once; later calls do nothing).
    A process that exits with it still open can abort in its teardown ("terminate called without an
    active exception", SIGABRT): 6 of 20 two-node gloo exits did here, and the node's launcher then
    exits 1 for a job that succeeded. Not after a failure: the others may never reach the wait."""
    import torch.distributed as dist

    if st is not None and dist.is_initialized():
        st.wait_for_everyone()
        st.destroy_process_group()


def on_main(st, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process only; every process gets its value. If it fails, the others fail
    with the same error and exit code."""
    from accelerate.utils import broadcast_object_list

    error, value = None, None
    if st is None or st.is_main_process:
        try:
            value = fn()
        except BaseException as e:
            error = e
    if st is not None:
        # The error's file and field travel with it, so every process names the same `--set` flag (cli._named).
        said = (str(error), getattr(error, "exit_code", 1), getattr(error, "source", None), getattr(error, "field", None))
        payload = [("ok", value) if error is None else ("error", said)]
        broadcast_object_list(payload, from_process=0)
        if payload[0][0] == "error" and error is None:
            text, code, source, field = payload[0][1]
            err = AlignpressError(text)
            err.exit_code, err.source, err.field = code, source, field
            err.echo = True  # the main process's error, said again: not a failure of this one (cli._fail)
            raise err
        value = payload[0][1] if error is None else None
    if error is not None:
        raise error
    return value


def from_main(fn: Callable[[], Any]) -> Any:
    """on_main for code that runs on every process (training): the main process's value everywhere."""
    return on_main(state(), fn)


def main_process_first():
    """accelerate's main_process_first under several processes; nothing otherwise."""
    from contextlib import nullcontext

    if not several():
        return nullcontext()
    return state().main_process_first()


def largest(value: int, device: Any = None) -> int:
    """The largest of every process's `value`, on every process: a decision that needs them all
    (save a checkpoint now, stop now) must be taken by all, or the ones that go on wait forever for
    the ones that stopped. One tiny all-reduce; `device` is where it runs (the GPU for NCCL)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
