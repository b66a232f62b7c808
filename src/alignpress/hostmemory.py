"""Host memory: what the job will hold in the machine's RAM, checked before the stages that hold it.

A machine too small for a stage is killed by the kernel (SIGKILL: no message, exit 137), and
the GPU time before is paid for. So `run`, `train` and `export` first compare, with this machine's
available memory (MemAvailable plus free swap, or less under a cgroup limit), what the stages still
to run hold at least:
- export: the model in float32 (4 bytes a weight): it merges the adapter there, and
  from_pretrained loads into host memory first, on a GPU machine too. A 7B model after QLoRA on a
  16 GB-RAM VM (27 GB in float32) would be killed at export, hours in. Measured on the CPU (benchmarks/bench_host_memory.py,
  a 0.40 B-weight model): export's process peaked at 4.6 bytes a weight saving float32, 6.2 saving
  bfloat16, plus 0.3 GB for python and the libraries; 4 bytes is the lower bound counted.
- train under DeepSpeed with CPU offload (the accelerate config's offload_optimizer_device /
  offload_param_device: cpu, as recipes/accelerate/zero3-offload.yaml): Adam's float32 weights
  and two moments for each trained weight (12 bytes; the offloaded float32 gradients come on top),
  and with parameter offload the 16-bit weights (2 bytes), shared by the nodes.
Only lower bounds are counted, so a run that fits is never refused. ALIGNPRESS_SKIP_MEMORY_CHECK=1
skips the check.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .disk import size_text
from .errors import AlignpressError
from .recipe import Recipe

SKIP_ENV = "ALIGNPRESS_SKIP_MEMORY_CHECK"


def _numbers(path: Path) -> dict[str, int]:
    """A cgroup stat file's `key value` lines."""
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}


def cgroup_memory_room(root: Path = Path("/sys/fs/cgroup"), membership: str | None = None) -> tuple[int, str] | None:
    """What this process's memory cgroup still allows (its limit less the memory its processes
    hold, page cache not counted: the kernel drops that first), and the file it comes from; None
    without a limit. membership: /proc/self/cgroup's text. The process's own cgroup folder is used
    where the mount shows it (no cgroup namespace), else the mount's root (a container's own)."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    paths = {}
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2].lstrip("/")
    try:
        if (root / "cgroup.controllers").exists():  # v2: memory.max on the path down to this cgroup
            own = root / paths.get("", "")
            folder = own if (own / "memory.max").exists() else root
            limits = [(int(text), f) for f in [folder, *folder.parents] if f.is_relative_to(root) and (f / "memory.max").exists()
                      and (text := (f / "memory.max").read_text().strip()) != "max"]
            if not limits:
                return None
            limit, at = min(limits)
            return limit - _numbers(folder / "memory.stat")["anon"], f"the memory limit in {at / 'memory.max'}, less what its processes hold"
        memory = root / "memory"  # v1: the limit counting the parents' (hierarchical_memory_limit)
        own = memory / paths.get("memory", "")
        folder = own if (own / "memory.stat").exists() else memory
        stats = _numbers(folder / "memory.stat")
        limit = stats.get("hierarchical_memory_limit", 2**63)
        if limit >= 2**60:
            return None
        return limit - stats["total_rss"], f"the memory limit in {folder / 'memory.stat'}, less what its processes hold"
    except (OSError, KeyError, ValueError):
        return None


def host_memory_available(meminfo: Path = Path("/proc/meminfo"), cgroup: tuple[int, str] | None = None) -> tuple[int, str] | None:
    """What this process may still allocate, and where that number comes from: the kernel's
    MemAvailable plus free swap, or less under a cgroup memory limit (`docker run --memory`, a
    Kubernetes limit: /proc/meminfo shows the host's memory there). None when neither is readable."""
    try:
        fields = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)}
        best = (fields["MemAvailable"] + fields.get("SwapFree", 0), f"{meminfo}: MemAvailable + SwapFree")
    except (OSError, KeyError, ValueError, IndexError):
        best = None
    room = cgroup if cgroup is not None else cgroup_memory_room()
    if room is not None and (best is None or room[0] < best[0]):
        best = room
    return best


def count_text(n: int) -> str:
    """`3.82 B`, `403.6 M`, `0.73 M`."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e7 else f"{n / 1e6:.2f} M"


def offload_need(recipe: Recipe, params: int, trainable: int) -> tuple[float, str] | None:
    """(bytes on each node, what they are) that DeepSpeed's CPU offload holds in host memory, at
    least; None when the recipe's accelerate config offloads nothing."""
    from .disk import accelerate_settings

    config = accelerate_settings(recipe)
    ds = config.get("deepspeed_config") or {} if str(config.get("distributed_type", "")).upper() == "DEEPSPEED" else {}
    need, parts = 0.0, []
    if str(ds.get("offload_optimizer_device", "none")).lower() == "cpu":
        need += 12 * trainable
        parts.append(f"Adam's float32 weights and two moments, 12 bytes x {count_text(trainable)} trained weights")
    if int(ds.get("zero_stage", 0) or 0) == 3 and str(ds.get("offload_param_device", "none")).lower() == "cpu":
        need += 2 * params
        parts.append(f"the 16-bit weights, 2 bytes x {count_text(params)}")
    if not parts:
        return None
    nodes = max(int(os.environ.get("SKYPILOT_NUM_NODES") or config.get("num_machines") or 1), 1)
    shared = f", shared by {nodes} nodes" if nodes > 1 else ""
    return need / nodes, f"training under DeepSpeed offloads to host memory {'; '.join(parts)}{shared}"


def needs(recipe: Recipe, stages: list[str], params: int, trainable: int) -> list[tuple[str, str, float, str]]:
    """(stage, the field that decides it, bytes at least, what they are) for each of `stages` that
    holds much in host memory: training under DeepSpeed's CPU offload, export."""
    out = []
    if "train" in stages and (offload := offload_need(recipe, params, trainable)):
        out.append(("training", "train.accelerate_config", *offload))
    if "export" in stages:
        loads = "merges the adapter into the base" if recipe.lora.enabled else "loads the trained weights"
        out.append(("export", "model.name_or_path", 4 * params, f"export {loads} in float32: {count_text(params)} weights x 4 bytes"))
    return out


def bigger_machine(need: float) -> str:
    """The way on. On SkyPilot, a launch flag: RAM in GB (2^30 bytes, as its catalogs count) for the
    bound times 1.6 (export's measured peak was 1.55 x it, benchmarks/bench_host_memory.py) plus 4 GB
    for python, the libraries and CUDA's host side."""
    if os.environ.get("SKYPILOT_TASK_ID"):
        gb = math.ceil(need * 1.6 / 2**30 + 4)
        return (f"Relaunch the same command with --memory {gb}+ (a VM with at least {gb} GB of RAM: 1.6 x this bound, as measured, plus 4 GB); "
                "it resumes from the bucket")
    return "Run on a machine with more memory (a cloud VM with more vCPUs has more)"


def check(recipe: Recipe, stages: list[str], params: int, trainable: int, available: tuple[int, str] | None = None) -> list[str]:
    """Refuses (exit 2) a machine whose memory cannot hold what `stages` hold at least; returns the
    log lines (one a stage that holds much)."""
    held = needs(recipe, stages, params, trainable)
    if not held:
        return []
    if os.environ.get(SKIP_ENV) == "1":
        return [f"host memory check skipped ({SKIP_ENV}=1)"]
    available = available or host_memory_available()
    if available is None:
        return []
    free, how = available
    lines = []
    for stage, field, need, what in held:
        if need > free:
            raise AlignpressError(f"not enough memory for {stage}: at least {size_text(need)} ({what}), and this machine has {size_text(free)} "
                                  f"available ({how}); the kernel would kill the job "
                                  + ("at export, after training" if stage == "export" else "while training") + f". {bigger_machine(need)}; "
                                  f"{SKIP_ENV}=1 skips this check", source=recipe.source, field=field)
        lines.append(f"host memory for {stage}: at least {size_text(need)} ({what}), {size_text(free)} available")
    return lines
