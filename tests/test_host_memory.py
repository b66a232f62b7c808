"""Host memory checked at the door (export's float32 merge, DeepSpeed's CPU offload), and the GPU's decided at export.

The refusals run the real entry point: once against this machine's /proc/meminfo (a model whose
float32 weights exceed it, built on the meta device from a config alone, no weights), once in a
real memory cgroup with a 2 GiB limit (cgroup v1 as root here; skipped where one cannot be made).
The GPU side (export_device) is the decision alone: no GPU here.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, cli

MEMORY_FIX = "Run on a machine with more memory (a cloud VM with more vCPUs has more); ALIGNPRESS_SKIP_MEMORY_CHECK=1 skips this check"


def test_host_memory_from_meminfo_and_cgroups(tmp_path):
    from alignpress.hostmemory import cgroup_memory_room, host_memory_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684084 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nSwapTotal: 2097148 kB\nSwapFree:        1048576 kB\n")
    assert host_memory_available(meminfo, cgroup=(2**62, "x")) == ((20000000 + 1048576) * 1024, f"{meminfo}: MemAvailable + SwapFree")
    assert host_memory_available(meminfo, cgroup=(3 * 2**30, "a limit")) == (3 * 2**30, "a limit")  # the smaller one
    assert host_memory_available(tmp_path / "none", cgroup=(3 * 2**30, "a limit")) == (3 * 2**30, "a limit")

    # cgroup v1, no namespace: the process's own folder, by /proc/self/cgroup; the parents' limit counts
    v1 = tmp_path / "v1"
    own = v1 / "memory" / "jobs" / "a"
    own.mkdir(parents=True)
    (v1 / "memory" / "memory.stat").write_text(f"rss 1\ntotal_rss 5\nhierarchical_memory_limit {2**63 - 4096}\n")
    (own / "memory.stat").write_text(f"cache 900000000\nrss 10\ntotal_rss 300000000\nhierarchical_memory_limit {4 * 2**30}\n")
    membership = "9:name=systemd:/\n4:memory:/jobs/a\n1:cpu:/\n"
    assert cgroup_memory_room(v1, membership) == (4 * 2**30 - 300000000, f"the memory limit in {own / 'memory.stat'}, less what its processes hold")
    # a container's own mount (its path not under the mount): the mount's root, here unlimited
    assert cgroup_memory_room(v1, "4:memory:/docker/0123\n") is None

    # cgroup v2: the smallest memory.max on the way down; the cgroup's anonymous memory is held
    v2 = tmp_path / "v2"
    leaf = v2 / "user.slice" / "job.scope"
    leaf.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "user.slice" / "memory.max").write_text(f"{8 * 2**30}\n")
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.stat").write_text("anon 1073741824\nfile 5000000000\n")
    assert cgroup_memory_room(v2, "0::/user.slice/job.scope\n") == (7 * 2**30, f"the memory limit in {v2 / 'user.slice' / 'memory.max'}, less what its processes hold")
    (v2 / "user.slice" / "memory.max").write_text("max\n")
    assert cgroup_memory_room(v2, "0::/user.slice/job.scope\n") is None


def test_host_memory_check_lines(monkeypatch):
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    from alignpress import hostmemory
    from alignpress.errors import AlignpressError
    from alignpress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    params = 3_821_079_552  # Phi-3-mini
    meminfo = "/proc/meminfo: MemAvailable + SwapFree"
    assert hostmemory.check(recipe, ["export"], params, 25_165_824, (32 * 2**30, meminfo)) == [
        "host memory for export: at least 14.2 GB (export merges the adapter into the base in float32: 3.82 B weights x 4 bytes), 32.0 GB available"]
    assert hostmemory.check(recipe, ["train", "evaluate"], params, 25_165_824, (1, meminfo)) == []  # no offload: training holds little there
    with pytest.raises(AlignpressError) as e:
        hostmemory.check(recipe, ["export"], 7_241_732_096, 41_943_040, (15 * 2**30, meminfo))  # Mistral-7B on a 16 GB VM
    assert str(e.value) == (f"{recipe.source}: field 'model.name_or_path': not enough memory for export: at least 27.0 GB (export merges the adapter "
                            "into the base in float32: 7.24 B weights x 4 bytes), and this machine has 15.0 GB available (/proc/meminfo: MemAvailable + "
                            f"SwapFree); the kernel would kill the job at export, after training. {MEMORY_FIX}")
    full = load_recipe(ROOT / "recipes/demo.yaml", ["lora.enabled=false"])
    assert hostmemory.check(full, ["export"], params, params, (32 * 2**30, meminfo))[0].startswith(
        "host memory for export: at least 14.2 GB (export loads the trained weights in float32: ")
    # on a SkyPilot VM the way on is a launch flag: 27.0 GB x 1.6 + 4 = 47.2, so 48 GB
    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-2026-11-29-10-00-00-000000_ap_1")
    with pytest.raises(AlignpressError) as e:
        hostmemory.check(recipe, ["export"], 7_241_732_096, 41_943_040, (15 * 2**30, meminfo))
    assert str(e.value).endswith("the kernel would kill the job at export, after training. Relaunch the same command with --memory 48+ (a VM "
                                 "with at least 48 GB of RAM: 1.6 x this bound, as measured, plus 4 GB); it resumes from the bucket; "
                                 "ALIGNPRESS_SKIP_MEMORY_CHECK=1 skips this check"), str(e.value)
    monkeypatch.setenv("ALIGNPRESS_SKIP_MEMORY_CHECK", "1")
    assert hostmemory.check(recipe, ["export"], 7_241_732_096, 0, (15 * 2**30, "x")) == ["host memory check skipped (ALIGNPRESS_SKIP_MEMORY_CHECK=1)"]


def test_deepspeed_cpu_offload_counts_adams_states_per_node(monkeypatch):
    """recipes/accelerate/zero3-offload.yaml: Adam's float32 weights and moments (12 bytes a trained
    weight) and the 16-bit weights (2 bytes) in host memory, shared by the nodes; ZeRO-2 without
    offload holds none there."""
    from alignpress import hostmemory
    from alignpress.errors import AlignpressError
    from alignpress.recipe import load_recipe

    monkeypatch.delenv("SKYPILOT_NUM_NODES", raising=False)
    monkeypatch.delenv("SKYPILOT_TASK_ID", raising=False)
    params = 3_821_079_552
    full = load_recipe(ROOT / "recipes/demo.yaml", ["lora.enabled=false", "train.accelerate_config=zero3-offload"])
    assert hostmemory.offload_need(full, params, params) == (
        14 * params, "training under DeepSpeed offloads to host memory Adam's float32 weights and two moments, 12 bytes x 3.82 B trained weights; "
                     "the 16-bit weights, 2 bytes x 3.82 B")
    with pytest.raises(AlignpressError) as e:
        hostmemory.check(full, ["train", "evaluate", "export"], params, params, (32 * 2**30, "/proc/meminfo: MemAvailable + SwapFree"))
    assert str(e.value) == (f"{full.source}: field 'train.accelerate_config': not enough memory for training: at least 49.8 GB (training under "
                            "DeepSpeed offloads to host memory Adam's float32 weights and two moments, 12 bytes x 3.82 B trained weights; the "
                            "16-bit weights, 2 bytes x 3.82 B), and this machine has 32.0 GB available (/proc/meminfo: MemAvailable + SwapFree); "
                            f"the kernel would kill the job while training. {MEMORY_FIX}")
    monkeypatch.setenv("SKYPILOT_NUM_NODES", "2")
    assert hostmemory.offload_need(full, params, params)[0] == 7 * params
    assert hostmemory.check(full, ["train"], params, params, (32 * 2**30, "m")) == [
        "host memory for training: at least 24.9 GB (training under DeepSpeed offloads to host memory Adam's float32 weights and two moments, "
        "12 bytes x 3.82 B trained weights; the 16-bit weights, 2 bytes x 3.82 B, shared by 2 nodes), 32.0 GB available"]
    assert hostmemory.offload_need(load_recipe(ROOT / "recipes/demo.yaml", ["train.accelerate_config=zero2"]), params, 25_165_824) is None
    assert hostmemory.offload_need(load_recipe(ROOT / "recipes/demo.yaml"), params, 25_165_824) is None


def test_export_device_moves_the_merge_to_the_cpu_when_the_gpu_has_no_room():
    from alignpress.export import export_device

    # Phi-3-mini (3.82 B weights, vocabulary 32064), 4 probe rows of 128 tokens: 14.2 GB + 0.1 GB of logits + 1 GB
    assert export_device("cuda", 3_821_079_552, 4, 128, 32064, 44 * 2**30) == (
        "cuda", "export merges on the GPU: the float32 model and its probe need about 15.4 GB, 44.0 GB free")
    # a 7B after QLoRA on a 24 GB GPU: 27.0 GB of float32 weights do not fit
    assert export_device("cuda", 7_241_732_096, 4, 128, 32000, 22 * 2**30) == (
        "cpu", "export merges on the CPU: the float32 model (27.0 GB) and its probe need about 28.1 GB of GPU memory and the GPU has 22.0 GB free; "
               "slower, the same result")
    # Gemma-2b's 256k vocabulary: the probe's logits count (2 x 4 x 128 x 256000 x 4 bytes = 1.0 GB)
    assert export_device("cuda", 2_506_172_416, 4, 128, 256000, 11 * 2**30)[0] == "cpu"
    assert export_device("cuda", 2_506_172_416, 4, 128, 256000, 12 * 2**30)[0] == "cuda"
    assert export_device("cpu", 7_241_732_096, 4, 128, 32000, None) == ("cpu", None)


def test_probe_rows_are_cut_to_probe_tokens(tiny_phi3):
    from transformers import AutoTokenizer

    from alignpress.export import PROBE_TOKENS, probe_batch

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    long = {"messages": {"prompt": [{"role": "user", "content": "word " * 400}], "chosen": [{"role": "assistant", "content": "ok"}]}}
    short = {"messages": {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "ok"}]}}
    ids, attn = probe_batch(tok, [long, short])
    full = len(tok.apply_chat_template(long["messages"]["prompt"] + long["messages"]["chosen"], tokenize=True, return_dict=True)["input_ids"])
    assert full > PROBE_TOKENS == ids.shape[1] == 128
    assert attn[0].sum().item() == 128 and 0 < attn[1].sum().item() < 20


def _config_only_model(folder: Path, hidden: int, layers: int) -> Path:
    """The builtin demo model's tokenizer and config, made `layers` x `hidden` wide, with no weights:
    the door builds it on the meta device."""
    from alignpress.modeling import built_builtin

    tiny = built_builtin("tiny-phi3-arithmetic")
    assert tiny is not None  # demo_run built it
    folder.mkdir()
    for f in tiny.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, folder / f.name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _params(hidden: int, layers: int) -> int:
    # per layer: qkv and o (4 h^2), gate_up and down (3 h x 4h), two norms; embeddings and head (442 each); the final norm
    return layers * (4 * hidden * hidden + 12 * hidden * hidden + 2 * hidden) + 2 * 442 * hidden + hidden


def test_a_machine_too_small_for_the_float32_merge_is_refused_at_the_door(tmp_path, demo_run):
    """This machine's own MemAvailable: a model 4 x its memory in float32 is refused before prepare."""
    from alignpress.disk import size_text
    from alignpress.hostmemory import count_text, host_memory_available

    available, _ = host_memory_available(cgroup=(2**62, "none"))
    hidden, layers = 4096, max(1, int(4 * available / 4 / (16 * 4096 * 4096)) + 1)
    model = _config_only_model(tmp_path / "big", hidden, layers)
    out = tmp_path / "out"
    recipe = tmp_path / "big.yaml"
    recipe.write_text((ROOT / "recipes/demo.yaml").read_text().replace("builtin:tiny-phi3-arithmetic", str(model))
                      .replace("data/arithmetic-capybara.jsonl", str(ROOT / "recipes/data/arithmetic-capybara.jsonl")))
    proc = cli("run", recipe, "--output-dir", out, "--set", "train.device=cpu", env={"ALIGNPRESS_SKIP_DISK_CHECK": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    params = _params(hidden, layers)
    head = (f"error: {recipe}: field 'model.name_or_path': not enough memory for export: at least {size_text(4 * params)} (export merges the adapter "
            f"into the base in float32: {count_text(params)} weights x 4 bytes), and this machine has ")
    assert last.startswith(head) and last.endswith(f" available (/proc/meminfo: MemAvailable + SwapFree); the kernel would kill the job at "
                                                    f"export, after training. {MEMORY_FIX}"), last
    assert not out.exists() and "== prepare" not in proc.stderr


def test_a_cgroup_memory_limit_is_what_counts(tmp_path, demo_run):
    """In a real memory cgroup limited to 2 GiB (v1, as root), a 0.8 B-weight model (3.2 GB in
    float32) is refused, naming the cgroup; /proc/meminfo still shows the whole machine there. The
    same model fully fine-tuned under ZeRO-3 with CPU offload is refused for training's share."""
    from alignpress.disk import size_text
    from alignpress.hostmemory import count_text

    group = Path("/sys/fs/cgroup/memory") / f"alignpress-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(2 * 2**30))
    except OSError:
        pytest.skip("cannot make a memory cgroup here (cgroup v1 and root needed)")
    try:
        hidden, layers = 2048, 12
        model = _config_only_model(tmp_path / "big", hidden, layers)
        recipe = tmp_path / "big.yaml"
        recipe.write_text((ROOT / "recipes/demo.yaml").read_text().replace("builtin:tiny-phi3-arithmetic", str(model))
                          .replace("data/arithmetic-capybara.jsonl", str(ROOT / "recipes/data/arithmetic-capybara.jsonl")))
        out = tmp_path / "out"
        script = f"echo $$ > {group}/cgroup.procs && exec \"$@\""
        import subprocess
        import sys

        env = {**os.environ, "ALIGNPRESS_SKIP_DISK_CHECK": "1"}
        proc = subprocess.run(["sh", "-c", script, "sh", sys.executable, str(ROOT / "entrypoint.py"), "run", str(recipe), "--output-dir", str(out), "--set", "train.device=cpu"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        params = _params(hidden, layers)
        assert f"(export merges the adapter into the base in float32: {count_text(params)} weights x 4 bytes), and this machine has " in last, last
        assert f" GB available (the memory limit in {group}/memory.stat, less what its processes hold); " in last, last
        shown = float(last.split(", and this machine has ")[1].split(" GB available")[0])
        assert 1.0 < shown < 2.0  # 2 GiB less the python process at the door
        # a full fine-tune under ZeRO-3 with CPU offload: training's share is refused first
        offload = ["--set", "lora.enabled=false", "--set", "train.accelerate_config=zero3-offload"]
        proc = subprocess.run(["sh", "-c", script, "sh", sys.executable, str(ROOT / "entrypoint.py"), "run", str(recipe), "--output-dir", str(out),
                               "--set", "train.device=cpu", *offload], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --set train.accelerate_config: field 'train.accelerate_config': not enough memory for training: at least "
                               f"{size_text(14 * params)} (training under DeepSpeed offloads to host memory Adam's float32 weights and two moments, "
                               f"12 bytes x {count_text(params)} trained weights; the 16-bit weights, 2 bytes x {count_text(params)}), and this "
                               "machine has "), last
        assert last.endswith("; the kernel would kill the job while training. " + MEMORY_FIX) and not out.exists()
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
