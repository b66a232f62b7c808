"""Multi-process training on the CPU: gloo DDP and DeepSpeed ZeRO-2, through the real entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli


def losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics/train.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def prepared_copy(demo_run, dest):
    """The demo's prepared data, with every later stage pending."""
    dest.mkdir()
    for name in ("data", "recipe.resolved.yaml"):
        src = demo_run[0] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    manifest = json.loads((demo_run[0] / "run.json").read_text())
    manifest["stages"] = {s: {"status": "done" if s == "prepare" else "pending"} for s in manifest["stages"]}
    (dest / "run.json").write_text(json.dumps(manifest))
    return dest


def test_two_gloo_processes_match_one(tmp_path, demo_run):
    """Same global batch (1 x 8 vs 2 x 4): the same losses, step by step."""
    one, two = prepared_copy(demo_run, tmp_path / "one"), prepared_copy(demo_run, tmp_path / "two")
    common = ["--set", "train.max_steps=12", "--set", "train.logging_steps=3"]
    a = cli("train", "recipes/demo.yaml", "--output-dir", one, *common, "--set", "train.per_device_train_batch_size=8")
    assert a.returncode == 0, a.stderr[-3000:]
    b = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "entrypoint.py"), "train", "recipes/demo.yaml",
                        "--output-dir", str(two), *common, "--set", "train.per_device_train_batch_size=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 4
    # Tolerance: float32 reductions in a different order across processes.
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    assert json.loads((two / "run.json").read_text())["stages"]["train"]["world_size"] == 2
    # The batch each optimizer step sees, said with the processes behind it (multi-node grows it).
    assert "[alignpress] each optimizer step: 8 pairs (1 process x 8 pairs x 1 accumulation steps)\n" in a.stderr
    assert ("[alignpress] each optimizer step: 8 pairs (2 processes x 4 pairs x 1 accumulation steps); train.learning_rate 0.0006 "
            "as the recipe sets it, for 2x the pairs of one process\n") in b.stderr
    assert (two / "adapter/adapter_model.safetensors").exists()

    # The same two processes with their decoder layers compiled (train.compile_layers; DDP's gradient
    # hooks fire from the compiled backward): the eager losses, and each process compiled its own graphs
    compiled = prepared_copy(demo_run, tmp_path / "compiled")
    c = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "entrypoint.py"), "train", "recipes/demo.yaml",
                        "--output-dir", str(compiled), *common, "--set", "train.per_device_train_batch_size=4", "--set", "train.compile_layers=true"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    assert losses(compiled) == pytest.approx(lb, rel=1e-5)
    assert c.stderr.count("torch.compile: 3 graphs compiled during training") == 2


def test_demo_under_deepspeed_zero2(tmp_path, demo_run):
    """The whole demo, relaunched by the recipe's accelerate_config under DeepSpeed ZeRO-2 on the CPU."""
    out = tmp_path / "ds"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", "train.accelerate_config=zero2", "--set", "train.num_processes=1",
               env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "relaunching under accelerate" in proc.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "export", "publish")] == ["done"] * 5
    assert manifest["stages"]["train"]["deepspeed_zero_stage"] == 2
    # DeepSpeed keeps the optimizer and scheduler in global_step*/, not optimizer.pt and scheduler.pt:
    # its checkpoints count as complete (they were all skipped, so a preempted run restarted at 0),
    # and one without its states does not.
    from alignpress.train import checkpoint_is_complete, complete_checkpoints

    saved = complete_checkpoints(out / "checkpoints")
    assert saved and not (saved[0] / "optimizer.pt").exists()
    (states,) = saved[0].glob("global_step*")
    assert sorted(p.name for p in states.iterdir() if p.name.endswith("_states.pt"))[-1].endswith("optim_states.pt")
    broken = tmp_path / "broken"
    shutil.copytree(saved[0], broken)
    for p in (broken / states.name).glob("*optim_states.pt"):
        p.unlink()
    assert not checkpoint_is_complete(broken)
    # The disk check's lower bound for a DeepSpeed checkpoint (alignpress.disk): 12 bytes a trained
    # weight for the fp32 master copy and moments, plus the adapter; measured 1.28 MB against 0.92 MB.
    from alignpress import disk
    from alignpress.checks import model_sizes
    from alignpress.recipe import load_recipe
    from alignpress.runstate import folder_size

    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["train.accelerate_config=zero2", "train.num_processes=1"])
    estimate = disk.checkpoint_bytes(recipe, model_sizes(recipe), train_bytes=4)
    assert estimate == 12 * 57344 + 4 * 57344
    assert all(estimate <= folder_size(p) <= 1.6 * estimate for p in saved), [folder_size(p) for p in saved]
    # A preempted DeepSpeed run resumes from it (train marked interrupted, as a killed run leaves it).
    manifest["stages"]["train"] = {"status": "interrupted"}
    (out / "run.json").write_text(json.dumps(manifest))
    again = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.accelerate_config=zero2", "--set", "train.num_processes=1",
                env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming training from {saved[0]}" in again.stderr
    step = int(saved[0].name.split("-")[1])
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["resumed_from_step"] == step
    ev = json.loads((out / "metrics/eval.json").read_text())
    reference = json.loads((demo_run[0] / "metrics/eval.json").read_text())
    assert ev["aligned"]["behaviour"] >= 0.9 and ev["aligned"]["preference_accuracy"] >= 0.9
    assert abs(ev["aligned"]["preference_accuracy"] - reference["aligned"]["preference_accuracy"]) <= 0.05


def test_demo_under_deepspeed_zero3_with_two_processes(tmp_path):
    """ZeRO-3 with its offload (zero3-offload) and two processes on the CPU: the whole run. After
    training, transformers still held the Trainer's DeepSpeed config, so evaluate's from_pretrained
    built the model under zero.Init, a collective among processes that had ended: exit 2, on a line
    that blamed the Hub."""
    out = tmp_path / "z3"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", "train.accelerate_config=zero3-offload", "--set", "train.num_processes=2",
               "--set", "train.max_steps=4", env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("prepare", "train", "evaluate", "export", "publish")] == ["done"] * 5
    assert (stages["train"]["deepspeed_zero_stage"], stages["train"]["world_size"], stages["train"]["global_step"]) == (3, 2, 4)
    card = (out / "model/README.md").read_text()
    assert "| training processes | 2 |\n| pairs per optimizer step | 16 |\n" in card  # 2 processes x 8 pairs x 1 accumulation step
    # the merged model gives the adapter model's logits, and differs from the base: trained weights were gathered
    assert stages["export"]["merge_max_abs_diff"] < 1e-4 and stages["export"]["change_from_base_max_abs_diff"] > 0.01


def test_a_relaunched_run_ends_on_its_own_error_and_exit_code(tmp_path):
    """`accelerate launch` exits 1 for any failure of its processes and ends on torch's report of
    them. The command the user typed says the main process's error line again, last, and exits with
    its code: 3 here, a failed export check (a tolerance no merge meets), not 1. Two processes: the
    other one ended after training with 0, and is not the cause."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = cli("run", "recipes/demo.yaml", "--output-dir", tmp_path / "run", "--set", "train.accelerate_config=ddp", "--set", "train.num_processes=2",
               "--set", "train.max_steps=4", "--set", "export.check_tolerance=1e-30", env={"TMPDIR": str(tmp)})
    assert "relaunching under accelerate" in proc.stderr
    # prepared by the command's process before the launch; the launched ones find it done
    assert proc.stderr.index("[alignpress] == prepare done in ") < proc.stderr.index("relaunching under accelerate") < proc.stderr.index("== prepare: already done, skipping")
    assert "ChildFailedError" in proc.stderr  # torch's report is still there, above
    assert "[alignpress] training is done: process 1 ends here; the main process evaluates, exports and publishes alone\n" in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: merged model's logits differ from the adapter model's by ") and last.endswith(" (> export.check_tolerance 1e-30)"), proc.stderr[-3000:]
    assert proc.returncode == 3
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["export"]["status"] == "failed"
    assert not list(tmp.glob("alignpress-exit-*"))  # the file that carried them is gone


def test_a_relaunched_run_prepares_before_the_launch_and_a_refusal_there_launches_nothing(demo_copy):
    """`run --restart` with train.accelerate_config prepares in the command's own process, before the
    launch: the launched processes used to wait for the main one's prepare in a collective that ends
    after 30 minutes, each holding its GPU. A prepare that refuses (a filter that keeps no row) then
    launches nothing, puts the folder back and says its error once, last."""
    before = json.loads((demo_copy / "run.json").read_text())
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--restart", "--set", "train.accelerate_config=ddp",
               "--set", "train.num_processes=2", "--set", "data.filters.min.rating_chosen=100")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[alignpress] preparing the data before the launch, in this process alone\n" in proc.stderr
    assert "relaunching under accelerate" not in proc.stderr and "the main process failed" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --set data.filters.min.rating_chosen: field 'data.filters.min.rating_chosen': keeps none of the "), proc.stderr[-3000:]
    assert lines[-2].startswith("[alignpress] --restart failed before it replaced any result: "), proc.stderr[-3000:]
    assert json.loads((demo_copy / "run.json").read_text()) == before


def test_which_launched_process_failure_is_said_last(tmp_path):
    """The choice among the launched processes' records (cli.launched_failure), each case built
    as the processes write them, since which one writes first is a race in a real launch."""
    from alignpress.cli import launched_failure

    def records(*rows):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for rank, fields in rows:
            (folder / f"{rank}.json").write_text(json.dumps({"rank": str(rank), **fields}))
        return folder

    def said(folder):
        e = launched_failure(folder, 1)
        return str(e), e.exit_code, e.again_prefix

    main_error = {"code": 3, "line": "error: the check failed", "time": 2.0}
    echo = {"code": 3, "line": "error: the main process failed: the check failed", "time": 1.0, "echo": True}
    # the main process's error, though the other's copy was written first
    assert said(records((0, main_error), (1, echo))) == ("the check failed", 3, None)
    # a node without the main process (sky/run.sh on several nodes) has only the copies: it says one
    assert said(records((1, echo), (2, {**echo, "time": 1.5}))) == ("the main process failed: the check failed", 3, None)
    # a failure, not the SIGTERM that torch's agent then sent the other process
    stopped = {"code": 143, "line": "error: stopped by SIGTERM; run again", "time": 1.0, "again_prefix": "stopped by SIGTERM"}
    lost = {"code": 1, "line": "error: RuntimeError: connection reset", "time": 2.0}
    assert said(records((0, stopped), (1, lost))) == ("RuntimeError: connection reset (process 1)", 1, None)
    # a preemption: every process stopped; the first line, and its advice to be made again
    assert said(records((0, stopped), (1, {**stopped, "time": 3.0}))) == ("stopped by SIGTERM; run again", 143, "stopped by SIGTERM")
    # a process that started and never ended: killed, named first, with the launcher's code
    assert said(records((0, lost), (1, {"time": 0.5}))) == (
        "process 1 launched under accelerate ended without an error line (killed: SIGKILL, out of host memory?); "
        "the first error line of the others: RuntimeError: connection reset", 1, None)
    assert said(records())[0].startswith("the processes launched under accelerate ended (exit 1) without an error line of their own")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nodes=1, node_rank=0, procs=1, port=None, script=ROOT / "entrypoint.py"):
    """entrypoint.py under torchrun, as `accelerate launch` starts it on each node (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            str(script), *map(str, args)]


def entrypoint_saying_if_the_process_group_is_open_at_exit(folder: Path, default_timeout_s: float | None = None) -> Path:
    """entrypoint.py, and a line at the process's exit: is torch's process group still open? A process
    that exits with it open can abort in its teardown (SIGABRT); that happened 6 times in 20 two-node
    exits, so a test that only runs the job would fail now and then. This line fails every time.
    `default_timeout_s`: torch's default timeout for a process group, shortened (gloo's is 30 minutes)."""
    script = folder / "entrypoint_then_say.py"
    shorter = ("import datetime, torch.distributed.distributed_c10d as c10d\n"
               f"c10d.default_pg_timeout = datetime.timedelta(seconds={default_timeout_s})\n") if default_timeout_s else ""
    script.write_text(
        "import atexit, runpy, sys\n"
        "import torch.distributed as dist\n" + shorter +
        # one write: print() writes its parts apart, and the other process's lines came in between
        "atexit.register(lambda: sys.stderr.write(f'process group open at exit: {dist.is_initialized()}\\n'))\n"
        f"sys.argv[0] = {str(ROOT / 'entrypoint.py')!r}\n"
        f"runpy.run_path({str(ROOT / 'entrypoint.py')!r}, run_name='__main__')\n")
    return script


def test_a_second_node_never_reads_what_the_main_process_wrote(tmp_path, demo_run):
    """Two "nodes" (two torchrun launches, one process each) whose output folders are different
    folders: the second one's view stays empty, as a node's own cache of the bucket can be when the
    main process has just written there (SkyPilot's MOUNT_CACHED). The run must not depend on it:
    stage statuses, the prepared pairs, the checkpoint and the speed levers come from the main process.
    It used to read data/train.jsonl itself (missing there) and decide the stages from its own run.json."""
    main_view = prepared_copy(demo_run, tmp_path / "node0")
    other_view = tmp_path / "node1"
    other_view.mkdir()
    port = free_port()
    common = ["--set", "train.max_steps=4", "--set", "train.per_device_train_batch_size=4", "--set", "eval.enabled=false",
              "--set", "dpo.precompute_ref_log_probs=auto", "--set", "train.num_train_epochs=20"]
    script = entrypoint_saying_if_the_process_group_is_open_at_exit(tmp_path)
    procs = [subprocess.Popen(torchrun("run", "recipes/demo.yaml", "--output-dir", view, *common, nodes=2, node_rank=rank, port=port, script=script),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, view in ((0, main_view), (1, other_view))]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        # Each process left the group before it exited (processes.leave).
        assert [line for line in err.splitlines() if line.startswith("process group open at exit:")] == ["process group open at exit: False"]
    manifest = json.loads((main_view / "run.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "export", "publish")] == ["done"] * 5
    train = manifest["stages"]["train"]
    assert (train["world_size"], train["global_step"]) == (2, 4)
    # 20 epochs would repay a precompute pass on one node; across nodes `auto` leaves it off.
    assert train["systems"]["precompute_ref_log_probs"] is False
    assert train["systems"]["precompute_ref_log_probs_decision"]["reason"].startswith("off: several nodes: TRL's main process writes")
    assert "already done, skipping" in outputs[1][1]  # node 1 skipped prepare because the main process said so
    assert not (other_view / "data").exists() and not (other_view / "run.json").exists()
    assert (main_view / "model" / "model.safetensors").exists()


def test_each_node_ends_on_the_main_processs_refusal_with_its_code(tmp_path):
    """Two "nodes" (two torchrun launches, one process each) whose prepare refuses (a filter that keeps
    no row), found by the main process alone. Each launcher exits 1; sky/run.sh then says its node's
    line and code from the records its processes left (`python -m alignpress.node_exit`): the main
    process's refusal on the head node, the other process's copy of it on the second, both with 2."""
    port = free_port()
    exits = [tmp_path / f"exits{rank}" for rank in (0, 1)]
    procs = []
    for rank in (0, 1):
        exits[rank].mkdir()
        procs.append(subprocess.Popen(torchrun("run", "recipes/demo.yaml", "--output-dir", tmp_path / f"node{rank}", "--set", "data.filters.min.rating_chosen=100",
                                               nodes=2, node_rank=rank, port=port), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "ALIGNPRESS_EXIT_DIR": str(exits[rank])}))
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [err[-2000:] for _, err in outputs]  # torchrun's, as accelerate launch's
    said = [subprocess.run([sys.executable, "-m", "alignpress.node_exit", str(folder), "1"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")}) for folder in exits]
    refusal = "--set data.filters.min.rating_chosen: field 'data.filters.min.rating_chosen': keeps none of the "
    assert [p.returncode for p in said] == [2, 2]
    assert said[0].stderr.startswith(f"error: {refusal}"), said[0].stderr
    assert said[1].stderr.startswith(f"error: the main process failed: {refusal}"), said[1].stderr
    assert [len(p.stderr.splitlines()) for p in said] == [1, 1]


def test_the_other_processes_end_after_training_and_never_wait_on_torchs_shorter_timeout(tmp_path, demo_run):
    """Two processes run the demo. After training, the main process evaluates, exports and publishes
    alone, and the other one ends at once: it used to wait for all of it in a collective, which NCCL's
    watchdog ends after its timeout, killing the job while a large model uploaded. The process group
    waits as long as the Trainer would have it (TrainingArguments.ddp_timeout, 30 minutes), not torch's
    default for NCCL (10 minutes). NCCL cannot run here: torch's default for gloo (30 minutes, the same
    as the Trainer's) is shortened to 0.05 s in these processes to stand for it."""
    out = prepared_copy(demo_run, tmp_path / "run")
    exits = tmp_path / "exits"  # each process's exit record (cli._exit_record), kept: no relaunching parent reads them
    exits.mkdir()
    script = entrypoint_saying_if_the_process_group_is_open_at_exit(tmp_path, default_timeout_s=0.05)
    proc = subprocess.run(torchrun("run", "recipes/demo.yaml", "--output-dir", out, "--set", "train.max_steps=4", procs=2, script=script),
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "ALIGNPRESS_EXIT_DIR": str(exits)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("process group open at exit: False") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("[alignpress] finished: ") == 1
    manifest = json.loads((out / "run.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "export", "publish")] == ["done"] * 5
    assert manifest["stages"]["train"]["world_size"] == 2
    ended = {r["rank"]: r for r in (json.loads(p.read_text()) for p in exits.glob("*.json"))}
    assert (ended["0"]["code"], ended["1"]["code"]) == (0, 0)
    # Process 1 ended before the main process wrote evaluate's results, the first thing after training.
    assert ended["1"]["time"] < (out / "metrics" / "eval.json").stat().st_mtime < ended["0"]["time"]
    assert "[alignpress] training is done: process 1 ends here; the main process evaluates, exports and publishes alone\n" in proc.stderr

    # A stage alone (here evaluate, again) under two processes: the main process's, and the other one ends at once.
    again = subprocess.run(torchrun("evaluate", "recipes/demo.yaml", "--output-dir", out, "--set", "train.max_steps=4", procs=2, script=script),
                           cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "ALIGNPRESS_EXIT_DIR": str(exits)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[alignpress] process 1 ends here: the main process runs evaluate alone\n" in again.stderr
    assert again.stderr.count("process group open at exit: False") == 2, again.stderr[-3000:]
    ended = {r["rank"]: r for r in (json.loads(p.read_text()) for p in exits.glob("*.json"))}
    assert ended["1"]["time"] < (out / "metrics" / "eval.json").stat().st_mtime < ended["0"]["time"]


def test_sigterm_to_one_process_stops_them_all_at_one_checkpoint(tmp_path, demo_run):
    """A SIGTERM reaches one process (a preempted node; the others are elsewhere). Every process saves
    the same checkpoint and stops; before, the one that got it saved and stopped alone and the others
    waited for it in their next collective."""
    import signal
    import time

    out = prepared_copy(demo_run, tmp_path / "run")
    proc = subprocess.Popen(torchrun("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.max_steps=400",
                                     "--set", "train.per_device_train_batch_size=2", "--set", "train.logging_steps=1",
                                     "--set", "train.save_steps=1000", procs=2),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics" / "train.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "no step logged"
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = {pid: dict(e.split("=", 1) for e in open(f"/proc/{pid}/environ").read().split("\0") if "=" in e).get("RANK") for pid in children}
    (rank1,) = [pid for pid, rank in ranks.items() if rank == "1"]
    os.kill(int(rank1), signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2, err[-3000:]  # both processes, at one step
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert all(f"at step {step};" in line for line in stopped)
    assert "another process received SIGTERM" in err
    from alignpress.train import checkpoint_is_complete

    assert checkpoint_is_complete(out / "checkpoints" / f"checkpoint-{step}")
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "interrupted"


def test_one_node_of_several_gpus_is_not_several_nodes(monkeypatch):
    """`auto` turns the precomputed reference off across nodes only (TRL's main process writes it where
    the other nodes cannot read it); one node with 2 GPUs keeps it."""
    from alignpress.processes import several_nodes

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert several_nodes() is False
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert several_nodes() is True
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert several_nodes() is False


def test_a_checkpoint_is_not_resumed_by_another_number_of_processes(tmp_path, demo_run):
    """A training interrupted under one process, resumed under two (another --gpus count, a hand
    launch): the Trainer would skip the steps done as if each had taken two processes' pairs, and go
    on with other batches (a DeepSpeed checkpoint does not load at all). Refused at the door, before
    any model loads, on both processes; the checkpoints stay. The same count resumes."""
    out = tmp_path / "run"
    shutil.copytree(demo_run[0], out)
    manifest = json.loads((out / "run.json").read_text())
    manifest["stages"]["train"] = {"status": "interrupted"}
    (out / "run.json").write_text(json.dumps(manifest))
    from alignpress.train import STAMP, latest_checkpoint

    newest = latest_checkpoint(out / "checkpoints")
    assert json.loads((newest / STAMP).read_text())["processes"] == 1
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = subprocess.run(torchrun("train", "recipes/demo.yaml", "--output-dir", out, procs=2), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's for any failure (sky/run.sh and a relaunch say the process's 2)
    refusal = (f"error: {out / 'checkpoints'}: {newest.name} was trained by 1 process (8 pairs per optimizer step), and this run has 2 (16): "
               "resumed, it would go on with other batches. Resume it with 1 (as many GPUs; train.num_processes), or `train --restart` "
               "to train anew here (the checkpoints move aside)")
    assert f"{refusal}\n" in proc.stderr and f"error: the main process failed: {refusal.removeprefix('error: ')}\n" in proc.stderr
    assert "[alignpress] == train\n" not in proc.stderr  # the stage never started
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "interrupted"
    again = cli("train", "recipes/demo.yaml", "--output-dir", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming training from {newest}" in again.stderr
