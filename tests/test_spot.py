"""Spot-safe training: SIGTERM saves and exits non-zero; incomplete checkpoints are skipped."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from alignpress.train import checkpoint_is_complete, checkpoint_problem, latest_checkpoint
from conftest import ROOT, cli
from test_tracking import read_events


def adapter_diff(a, b):
    x, y = load_file(a / "adapter/adapter_model.safetensors"), load_file(b / "adapter/adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def signal_in_training(out, signum):
    """The demo run with a step logged every step, sent `signum` once training has logged; (exit code, stderr)."""
    args = ["run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "train.logging_steps=1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics/train.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_sigterm_saves_and_resumes(tmp_path, demo_run):
    out = tmp_path / "spot"
    code, err = signal_in_training(out, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert "error: stopped by SIGTERM at step" in err
    stage = json.loads((out / "run.json").read_text())["stages"]["train"]
    assert stage["status"] == "interrupted"
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) < 53
    assert not (out / "adapter").exists()
    tracked = json.loads((out / "run.json").read_text())["tracking"]
    first_files = set((out / "tensorboard").glob("events.out.tfevents.*"))
    assert first_files

    again = cli("run", "recipes/demo.yaml", "--output-dir", out, "--set", "train.logging_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming training from {saved}" in again.stderr
    assert adapter_diff(out, demo_run[0]) < 1e-4

    # The resumed run continues the same tracked run: same id, same TensorBoard folder, and its
    # curve joins the first one's (steps logged after the checkpoint are logged again; the newer wins).
    assert json.loads((out / "run.json").read_text())["tracking"] == tracked
    assert first_files < set((out / "tensorboard").glob("events.out.tfevents.*"))
    curve = dict(read_events(out / "tensorboard")["train/loss"])
    losses = [(h["step"], h["loss"]) for h in map(json.loads, (out / "metrics/train.jsonl").read_text().splitlines()) if "loss" in h]
    assert sorted(curve) == [s for s, _ in losses] == list(range(1, losses[-1][0] + 1))
    assert [curve[s] for s, _ in losses] == pytest.approx([v for _, v in losses], rel=1e-6)
    # One closing summary, the resumed run's: the interrupted run's (at the step it stopped on) is dropped.
    history = [json.loads(line) for line in (out / "metrics/train.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "train_runtime" in h] == [history[-1]["step"]] == [losses[-1][0]]


def train_again(out):
    """The `train` stage again in a copy of the finished demo: training and what follows it marked pending."""
    manifest = json.loads((out / "run.json").read_text())
    for s in ("train", "evaluate", "export", "publish"):
        manifest["stages"][s] = {"status": "pending"}
    (out / "run.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "adapter")
    return cli("train", "recipes/demo.yaml", "--output-dir", out)


def test_rotation_keeps_the_newest_complete_checkpoints_by_step_whatever_their_times(tmp_path, demo_run):
    """transformers rotates checkpoints by their folders' times (Trainer._save_checkpoint: use_mtime=True). A
    folder restored from a bucket (a parallel copy) or read through a cloud mount has times in no useful
    order, and a save cut short leaves an incomplete folder newer than the complete ones: transformers then
    kept the incomplete one and deleted the newest complete ones. alignpress rotates by step, counting
    complete checkpoints only, and removes the incomplete ones older than the save."""
    out = tmp_path / "restored"
    shutil.copytree(demo_run[0], out)
    ck = out / "checkpoints"
    shutil.rmtree(ck / "checkpoint-53")  # resume from 40: the one save left is the final one, 53
    for step in (20, 30, 45):
        shutil.copytree(ck / "checkpoint-40", ck / f"checkpoint-{step}")
    (ck / "checkpoint-45" / "optimizer.pt").unlink()
    now = time.time()
    for age, step in ((400, 40), (300, 30), (200, 20), (100, 45)):  # the newest by step is the oldest by time
        os.utime(ck / f"checkpoint-{step}", (now - age, now - age))
    proc = train_again(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming training from {ck / 'checkpoint-40'} (step 40)" in proc.stderr
    # save_total_limit 2: the checkpoint resumed from and the new one.
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-53"]
    lines = [line for line in proc.stderr.split("\n") if "removing checkpoint" in line]
    # each on a line of its own, above the progress bar (cli.AboveTheBars clears the bar first: "\r   \r"),
    # not glued to the end of the bar's line ("... 2.1it/s][alignpress] removing ...")
    assert all(re.fullmatch(r"[\r ]*\[alignpress\] removing checkpoint [^\r]*", line) for line in lines), lines
    removed = [line.split("[alignpress] ", 1)[1] for line in lines]
    assert removed == [f"removing checkpoint {ck / 'checkpoint-20'}: train.save_total_limit 2 keeps checkpoint-40 and checkpoint-53",
                       f"removing checkpoint {ck / 'checkpoint-30'}: train.save_total_limit 2 keeps checkpoint-40 and checkpoint-53",
                       f"removing checkpoint {ck / 'checkpoint-45'}: incomplete (optimizer.pt is missing or empty), left by a save cut short"], proc.stderr[-3000:]
    assert adapter_diff(out, demo_run[0]) < 1e-4


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, demo_run):
    out = tmp_path / "corrupt"
    shutil.copytree(demo_run[0], out)
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-40", "checkpoint-53"]
    assert checkpoint_is_complete(ckpts[-1])
    # Every file the resume reads counts: a truncated upload of any of them makes it incomplete.
    # The warning names the file and why (it said only "skipping incomplete checkpoint DIR").
    reasons = {"adapter_model.safetensors": "SafetensorError", "scheduler.pt": "BadZipFile", "training_args.bin": "BadZipFile",
               "trainer_state.json": "JSONDecodeError"}
    for name, error in reasons.items():
        saved_file = (ckpts[-1] / name).read_bytes()
        (ckpts[-1] / name).write_bytes(saved_file[:-100])
        assert not checkpoint_is_complete(ckpts[-1]), name
        assert checkpoint_problem(ckpts[-1]) == f"{name} cannot be read ({error}: cut short?)"
        (ckpts[-1] / name).write_bytes(saved_file)
    (ckpts[-1] / "optimizer.pt").rename(tmp_path / "optimizer.pt")
    assert checkpoint_problem(ckpts[-1]) == "optimizer.pt is missing or empty"
    (tmp_path / "optimizer.pt").rename(ckpts[-1] / "optimizer.pt")
    assert checkpoint_is_complete(ckpts[-1])
    # The reported case: rng_state.pth cut short (Trainer._load_rng_state failed with OSError 22).
    rng = ckpts[-1] / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:-1000])
    assert not checkpoint_is_complete(ckpts[-1])
    assert latest_checkpoint(out / "checkpoints") == ckpts[0]
    optimizer = ckpts[0] / "optimizer.pt"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[: len(saved) // 2])
    assert latest_checkpoint(out / "checkpoints") is None
    optimizer.write_bytes(saved)

    # Train again from the surviving checkpoint: it reaches the uninterrupted result.
    proc = train_again(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping incomplete checkpoint {ckpts[-1]}: rng_state.pth cannot be read (BadZipFile: cut short?)\n" in proc.stderr
    assert f"resuming training from {ckpts[0]} (step 40)" in proc.stderr
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "done"
    assert adapter_diff(out, demo_run[0]) < 1e-4


def test_output_folder_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = cli("run", "recipes/demo.yaml", "--output-dir", blocker / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {blocker / 'out'}: output folder cannot be made: {blocker} is a file, not a folder; give --output-dir a folder"
    proc = cli("run", "recipes/demo.yaml", "--output-dir", blocker)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {blocker}: output folder is a file, not a folder; give --output-dir a folder"
    assert blocker.read_text() == "not a folder"


def relaunched_in_training(out, procs=1):
    """The demo's `run`, relaunched under `accelerate launch` (train.accelerate_config, gloo on the
    CPU), once it has logged a training step: the command's process, and the pids of its launcher and workers."""
    args = ["run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "train.logging_steps=1",
            "--set", "train.accelerate_config=ddp", "--set", f"train.num_processes={procs}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "metrics/train.jsonl").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    pids = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    return proc, [int(p) for p in pids if int(p) != proc.pid]


def test_sigterm_reaches_the_workers_of_a_relaunched_run(tmp_path, demo_run):
    """`run` with train.accelerate_config relaunches itself under `accelerate launch`. A SIGTERM to
    the command (`docker stop`, a preemption) used to stop it alone: the worker trained on, asked for
    no checkpoint, and the folder's lock was free for a second command while it still wrote there."""
    out = tmp_path / "relaunched"
    proc, workers = relaunched_in_training(out)
    assert workers  # the accelerate launcher and its worker
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    # the worker's own line, said again last, and its code: `accelerate launch` itself exits 1
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM at step ") and last.endswith("Run `run` or `train` again, without --restart, to resume from it"), err[-3000:]
    time.sleep(1)
    alive = [p for p in workers if subprocess.run(["kill", "-0", str(p)], capture_output=True).returncode == 0]
    assert alive == []
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "interrupted"
    assert checkpoint_is_complete(latest_checkpoint(out / "checkpoints"))


def test_a_relaunched_run_whose_worker_is_killed_says_so_last(tmp_path, demo_run):
    """SIGKILL (the kernel's out-of-memory killer) leaves a worker no time for a line, and the other
    one then fails on the lost connection: the command the user typed names the killed process
    first, not on torch's report or the other's error alone, with the launcher's code."""
    proc, pids = relaunched_in_training(tmp_path / "killed", procs=2)
    (worker,) = [p for p in pids if "RANK=1" in open(f"/proc/{p}/environ").read().split("\0")]
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "Signal 9 (SIGKILL) received by PID" in err or "exitcode  : -9" in err, err[-3000:]  # torch's report, above
    assert err.strip().splitlines()[-1].startswith("error: process 1 launched under accelerate ended without an error line (killed: "
                                                   "SIGKILL, out of host memory?); the first error line of the others: "), err[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_error_is_reported_does_not_cut_its_line(monkeypatch, capsys, signum):
    """The race the test above met once in CI, made certain: the surviving worker was writing its own
    error's traceback to the log when torch's launcher sent it SIGTERM, and it ended with Python's
    traceback of the signal instead of its error line. In process, with the real signal."""
    from alignpress import cli as cli_module

    def failing(args, argv):
        raise RuntimeError("the connection to process 1 was lost")

    def reporting(error, args):
        os.kill(os.getpid(), signum)  # delivered to this thread before kill returns
        return f"{type(error).__name__}: {error}"

    monkeypatch.setattr(cli_module, "execute", failing)
    monkeypatch.setattr(cli_module, "_unexpected", reporting)
    before = signal.getsignal(signum)
    assert cli_module.main(["train", "recipes/demo.yaml"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: RuntimeError: the connection to process 1 was lost"
    assert signal.getsignal(signum) == before  # handlers put back as they were


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow)])
def test_ctrl_c_and_a_closed_terminal_save_like_sigterm(tmp_path, demo_run, signum, code):
    """Ctrl-C and SIGHUP (a closed SSH session) during training lost every step since the last
    checkpoint: SIGINT exited 130 with nothing saved, SIGHUP killed the process with the lock held.
    Both now save after the current step, as SIGTERM does, and the stage is `interrupted`."""
    out = tmp_path / "stopped"
    exit_code, err = signal_in_training(out, signum)
    name = signal.Signals(signum).name
    assert exit_code == code, err[-3000:]
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) < 53
    assert err.strip().splitlines()[-1] == (f"error: stopped by {name} at step {saved.name.split('-')[1]}; a checkpoint was saved in "
                                            f"{out}/checkpoints. Run `run` or `train` again, without --restart, to resume from it")
    assert f"{name} received: saving a checkpoint after this step, then stopping" in err
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "interrupted"
    assert not (out / "run.lock").exists()
