"""Nothing finished is lost: --restart redoes only its stage, checkpoints that cannot be resumed are
passed over, a full disk and unexpected failures end in one line with the state kept consistent."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from alignpress.errors import AlignpressError
from alignpress.runstate import RunDir
from alignpress.train import checkpoint_is_complete, latest_checkpoint
from conftest import ROOT, cli
from test_spot import adapter_diff

STAGES = ["prepare", "train", "evaluate", "export", "publish"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: to show a folder is byte-identical."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def statuses(out: Path) -> list[str]:
    stages = json.loads((out / "run.json").read_text())["stages"]
    return [stages[s]["status"] for s in STAGES]


def set_pending(out: Path, *names: str) -> None:
    manifest = json.loads((out / "run.json").read_text())
    for s in names:
        manifest["stages"][s] = {"status": "pending"}
    (out / "run.json").write_text(json.dumps(manifest))


def test_publish_restart_without_export_deletes_nothing(demo_copy):
    set_pending(demo_copy, "export", "publish")
    before = tree(demo_copy)
    proc = cli("publish", "recipes/demo.yaml", "--restart", "--output-dir", demo_copy)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {demo_copy / 'run.json'}: stage publish needs export to be done first (run.json says pending): "
                                                    f"run `entrypoint.py export recipes/demo.yaml --output-dir {demo_copy}` (or `run`)")
    assert tree(demo_copy) == before  # adapter/, checkpoints/, data/, metrics/, model/ and run.json untouched
    assert not (demo_copy / "run.lock").exists()


def test_evaluate_restart_redoes_only_evaluate(demo_copy):
    kept = {name: tree(demo_copy / name) for name in ("data", "adapter", "checkpoints", "model")}
    proc = cli("evaluate", "recipes/demo.yaml", "--restart", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--restart: stages from evaluate on will run again; finished results stay until replaced" in proc.stderr
    assert statuses(demo_copy) == ["done", "done", "done", "pending", "pending"]
    for name, files in kept.items():
        assert tree(demo_copy / name) == files, name  # model/ stays (stale) until export replaces it
    assert (demo_copy / "metrics/eval.json").is_file()


def test_restart_refused_in_prepare_leaves_the_folder_as_it_was(demo_copy):
    """`run --restart` with a filter that keeps no row fails in prepare, before it replaced anything:
    run.json, the resolved recipe, the checkpoints and the step log are as they were, so the old
    recipe still runs in the folder (every stage done) instead of being refused as different."""
    before = tree(demo_copy)
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--restart", "--set", "data.filters.max_tokens=5")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --set data.filters.max_tokens: field 'data.filters.max_tokens': no training rows left after filtering")
    assert "recipe sections data changed: --restart redoes the stages that use them" in proc.stderr
    assert f"--restart failed before it replaced any result: {demo_copy} is as it was (run.json, recipe.resolved.yaml, checkpoints)" in proc.stderr
    after = tree(demo_copy)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    again = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: already done, skipping" in again.stderr


def test_relaunched_train_restart_stopped_before_a_checkpoint_puts_the_folder_back(demo_copy):
    """`train --restart` relaunched under accelerate (train.accelerate_config), stopped by SIGTERM as
    its launched process starts training, before a first checkpoint: the command the user typed
    puts the folder back (the old checkpoints too, not left in checkpoints.previous) and its last
    line says to run the same command again, not the launched process's "without --restart"."""
    before = tree(demo_copy)
    args = [sys.executable, str(ROOT / "entrypoint.py"), "train", "recipes/demo.yaml", "--output-dir", str(demo_copy), "--restart",
            "--set", "train.accelerate_config=ddp", "--set", "train.num_processes=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "[alignpress] == train\n" in line:  # said by the launched process
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err[-3000:]
    assert "relaunching under accelerate" in err
    lines = err.strip().splitlines()
    assert lines[-2:] == [f"[alignpress] --restart failed before it replaced any result: {demo_copy} is as it was (run.json, recipe.resolved.yaml, checkpoints)",
                          "error: stopped by SIGTERM; the folder is as it was before --restart: run the same command again to redo it"], err[-3000:]
    after = tree(demo_copy)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert statuses(demo_copy) == ["done"] * 5


def test_prepare_restart_with_the_same_recipe_and_data_keeps_the_later_stages(demo_copy):
    """`prepare --restart` that prepares the same data for the same recipe: the trained, evaluated and
    exported results stand, and the checkpoints are back where training resumes from them."""
    ckpts, train_log = tree(demo_copy / "checkpoints"), (demo_copy / "metrics/train.jsonl").read_bytes()
    manifest = json.loads((demo_copy / "run.json").read_text())
    proc = cli("prepare", "recipes/demo.yaml", "--output-dir", demo_copy, "--restart")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared data unchanged (fingerprint " in proc.stderr and "later stages stay as they are" not in proc.stderr
    assert ("same recipe and prepared data as before --restart: the later stages' results stand (train, evaluate, export, publish done), "
            f"and so does run {manifest['run_id']}") in proc.stderr
    assert statuses(demo_copy) == ["done"] * 5
    after = json.loads((demo_copy / "run.json").read_text())
    # The same results are the same run (the card and the Hub tag name it)
    assert (after["run_id"], after.get("previous_run_ids", [])) == (manifest["run_id"], manifest.get("previous_run_ids", []))
    assert [after["stages"][s] for s in STAGES[1:]] == [manifest["stages"][s] for s in STAGES[1:]]
    assert tree(demo_copy / "checkpoints") == ckpts and (demo_copy / "metrics/train.jsonl").read_bytes() == train_log
    assert not list(demo_copy.glob("*.previous")) and not list((demo_copy / "metrics").glob("*.previous"))
    # A changed recipe (the seed: training only) is not the same run: the later stages run again
    changed = cli("prepare", "recipes/demo.yaml", "--output-dir", demo_copy, "--restart", "--set", "train.seed=7")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "the later stages' results stand" not in changed.stderr
    assert statuses(demo_copy) == ["done", "pending", "pending", "pending", "pending"]
    assert tree(demo_copy / "checkpoints.previous") == ckpts


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_outside_training_marks_the_stage_and_frees_the_folder(demo_copy, signum, code):
    """SIGTERM during evaluate (a preemption, `docker stop`): exit 143 with one line saying what to do,
    the stage marked interrupted, the lock released; the next run finishes it. SIGHUP (a closed SSH
    session) too: it used to end the process at once, with the lock held and the stage `running`."""
    set_pending(demo_copy, "evaluate", "export", "publish")
    args = [sys.executable, str(ROOT / "entrypoint.py"), "evaluate", "recipes/demo.yaml", "--output-dir", str(demo_copy)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the stage has started: it loads two models and scores 90 pairs each
        seen.append(line)
        if "evaluate base: chosen log-probs" in line:
            proc.send_signal(signum)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == code, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: stopped by {signal.Signals(signum).name}; run the same command again to go on: finished stages are kept"
    manifest = json.loads((demo_copy / "run.json").read_text())
    assert manifest["stages"]["evaluate"]["status"] == "interrupted"
    assert not (demo_copy / "run.lock").exists()
    again = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert again.returncode == 0, again.stderr[-3000:]
    assert statuses(demo_copy) == ["done"] * 5 and "== train: already done, skipping" in again.stderr


@pytest.mark.slow
def test_train_restart_keeps_old_results_until_replaced(demo_copy, demo_run):
    """`train --restart` trains from step 0; the old adapter, checkpoints and prepared data stay
    while it runs, survive its interruption, and the old checkpoints go only once it is done."""
    out = demo_copy
    data, adapter, ckpts = tree(out / "data"), tree(out / "adapter"), tree(out / "checkpoints")
    prepare_entry = json.loads((out / "run.json").read_text())["stages"]["prepare"]
    args = ["train", "recipes/demo.yaml", "--output-dir", str(out), "--restart", "--set", "train.logging_steps=1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # The old step log is set aside first; the new one appears with the first logged step.
    while time.time() < deadline and not ((out / "metrics/train.jsonl.previous").exists() and (out / "metrics/train.jsonl").exists()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert statuses(out) == ["done", "interrupted", "pending", "pending", "pending"]
    assert json.loads((out / "run.json").read_text())["stages"]["prepare"] == prepare_entry
    assert tree(out / "data") == data and tree(out / "adapter") == adapter
    assert tree(out / "checkpoints.previous") == ckpts  # set aside, not deleted
    assert (out / "metrics/train.jsonl.previous").is_file() and (out / "model").is_dir()
    new = latest_checkpoint(out / "checkpoints")
    assert new is not None and int(new.name.split("-")[1]) < 40

    # Resuming the restarted training (no --restart) finishes it; only then is the old one dropped.
    again = cli("train", "recipes/demo.yaml", "--output-dir", out, "--set", "train.logging_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming training from {new}" in again.stderr
    assert statuses(out) == ["done", "done", "pending", "pending", "pending"]
    assert not (out / "checkpoints.previous").exists() and not (out / "metrics/train.jsonl.previous").exists()
    assert tree(out / "data") == data
    assert adapter_diff(out, demo_run[0]) < 1e-4
    steps = [json.loads(line)["step"] for line in (out / "metrics/train.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 53


@pytest.mark.slow
def test_run_restart_keeps_finished_results_until_replaced(demo_copy):
    """`run --restart` redoes every stage, but a failure on the way (here SIGTERM in training)
    leaves every finished result of the old run in place."""
    out = demo_copy
    old = {name: tree(out / name) for name in ("data", "adapter", "model", "checkpoints")}
    eval_json = (out / "metrics/eval.json").read_bytes()
    args = ["run", "recipes/demo.yaml", "--output-dir", str(out), "--restart", "--set", "train.logging_steps=1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics/train.jsonl.previous").exists() and (out / "metrics/train.jsonl").exists()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "--restart: stages from prepare on will run again; finished results stay until replaced" in err
    assert statuses(out) == ["done", "interrupted", "pending", "pending", "pending"]
    assert tree(out / "data") == old["data"]  # prepared again: the same bytes, swapped in
    assert tree(out / "adapter") == old["adapter"] and tree(out / "model") == old["model"]
    assert tree(out / "checkpoints.previous") == old["checkpoints"]
    assert (out / "metrics/eval.json").read_bytes() == eval_json


@pytest.mark.slow
def test_resume_falls_back_when_a_checkpoint_fails_to_load(demo_copy, demo_run):
    """checkpoint-53 passes every file check but its optimizer state is not this optimizer's:
    the Trainer fails loading it, and training resumes from checkpoint-40 instead."""
    out = demo_copy
    ckpts = out / "checkpoints"
    torch.save({"state": {}, "param_groups": []}, ckpts / "checkpoint-53/optimizer.pt")
    assert checkpoint_is_complete(ckpts / "checkpoint-53")
    set_pending(out, "train", "evaluate", "export", "publish")
    proc = cli("train", "recipes/demo.yaml", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {ckpts / 'checkpoint-53'} failed (ValueError: loaded state dict has a different number of parameter groups); falling back to {ckpts / 'checkpoint-40'}" in proc.stderr
    assert f"resuming training from {ckpts / 'checkpoint-40'} (step 40)" in proc.stderr
    assert statuses(out)[1] == "done"
    assert adapter_diff(out, demo_run[0]) < 1e-4


def test_a_fallback_checkpoint_of_other_data_is_refused(demo_copy):
    """Only the newest checkpoint's stamp was checked: when it failed to load, training fell back to
    an older one trained on other data (a folder whose records were moved away) and resumed it."""
    ckpts = demo_copy / "checkpoints"
    torch.save({"state": {}, "param_groups": []}, ckpts / "checkpoint-53/optimizer.pt")
    stamp = json.loads((ckpts / "checkpoint-40/alignpress.json").read_text())
    stamp["data_fingerprint"] = "0" * 64
    (ckpts / "checkpoint-40/alignpress.json").write_text(json.dumps(stamp))
    set_pending(demo_copy, "train", "evaluate", "export", "publish")
    proc = cli("train", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "falling back to" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {ckpts}: checkpoint-40 was trained with another recipe or data (") and "alignpress.json" in last
    assert statuses(demo_copy)[1] == "failed" and (ckpts / "checkpoint-40").is_dir() and (ckpts / "checkpoint-53").is_dir()  # nothing deleted


def test_unexpected_failure_is_one_line_with_a_log(demo_copy):
    """An adapter whose header names a dtype safetensors does not know (its length and offsets intact,
    so the check for cut-short weights passes it) makes safetensors raise deep inside peft: one line,
    the traceback in logs/."""
    weights = demo_copy / "adapter/adapter_model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert b'"F32"' in data[8:8 + n]
    weights.write_bytes(data[:8] + data[8:8 + n].replace(b'"F32"', b'"Q32"') + data[8 + n:])
    model = tree(demo_copy / "model")
    proc = cli("export", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 1, proc.stderr[-3000:]
    logs = list((demo_copy / "logs").glob("export-*.log"))
    assert len(logs) == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SafetensorError: ") and last.endswith(f" (see {logs[0]})"), last
    assert "Traceback" not in proc.stderr
    text = logs[0].read_text()
    assert text.startswith("alignpress export recipes/demo.yaml: SafetensorError: ") and "Traceback (most recent call last)" in text and "peft" in text
    manifest = json.loads((demo_copy / "run.json").read_text())
    assert manifest["stages"]["export"]["status"] == "failed"
    assert tree(demo_copy / "model") == model  # the previous export stays
    assert not (demo_copy / "model.partial").exists()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size", ["1m", "4m"])
def test_disk_full(tmp_path, demo_run, size):
    """The output folder on a small tmpfs (needs root to mount; skipped otherwise), filling during the
    run: the disk check at the door is skipped, as when something else fills the disk meanwhile."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, size):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out"
        proc = cli("run", "recipes/demo.yaml", "--output-dir", out, env={"ALIGNPRESS_SKIP_DISK_CHECK": "1"})
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out}: no space left on device while writing "), last
        assert last.endswith(f" MB free of {size[0]}.0 MB now; free some space, then run the same command again to resume"), last
        assert "Traceback" not in proc.stderr
        stages = json.loads((out / "run.json").read_text())["stages"]
        failed = [s for s in STAGES if stages[s]["status"] == "failed"]
        assert len(failed) == 1 and stages[failed[0]]["error"] == last.removeprefix("error: ")
        assert all(stages[s]["status"] == "done" for s in STAGES[: STAGES.index(failed[0])])
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
        assert not (out / "run.lock").exists()
        if (out / "checkpoints").exists():
            assert all(checkpoint_is_complete(p) for p in (out / "checkpoints").glob("checkpoint-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


DISK_FIX = "free some space, or write elsewhere (--output-dir; HF_HOME for the model download). ALIGNPRESS_SKIP_DISK_CHECK=1 skips this check"


def test_a_disk_too_small_is_refused_before_training(tmp_path, demo_run):
    """The demo writes about 5 MB (checkpoints, adapter, merged model): on a 1 MB disk the door
    refuses before anything is written; on a 4 MB one the door, counting one checkpoint, lets it
    through, and once prepare has counted the pairs (417: 53 steps, saves at 20, 40 and 53, two
    kept) the check before training refuses, with prepare kept."""
    from alignpress.disk import size_text

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "out"
        proc = cli("run", "recipes/demo.yaml", "--output-dir", out)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {out}: not enough disk space: train and export will write at least 3.8 MB to {out} (1 checkpoint of 0.7 MB, more once "
            f"prepare has counted the pairs; the trained adapter 0.2 MB; the merged model 2.9 MB) and its disk has 1.0 MB free; {DISK_FIX}")
        assert not out.exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    if not _tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = cli("run", "recipes/demo.yaml", "--output-dir", out)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        free = shutil.disk_usage(disk).free
        assert last == (
            f"error: {out}: not enough disk space: train and export will write at least 4.5 MB to {out} (2 checkpoints of 0.7 MB (3 while the "
            f"oldest is rotated out); the trained adapter 0.2 MB; the merged model 2.9 MB) and its disk has {size_text(free)} free; {DISK_FIX}"), last
        assert "[alignpress] disk for train and export: " + f"{out}: at least 3.8 MB" in proc.stderr  # the door's line
        assert statuses(out) == ["done", "pending", "pending", "pending", "pending"]
        assert not (out / "checkpoints").exists() and not (out / "run.lock").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_disk_estimate_against_what_training_wrote(demo_run, tmp_path):
    """alignpress.disk's parts against the files written: the demo's run (LoRA, float32 on the CPU)
    and a two-step full fine-tune. Each is at most what was written, and close to it."""
    from alignpress import disk
    from alignpress.checks import model_sizes
    from alignpress.recipe import load_recipe
    from alignpress.runstate import RunDir, folder_size
    from test_distributed import prepared_copy

    out = demo_run[0]
    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    sizes = model_sizes(recipe)
    assert (sizes.params, sizes.trainable, sizes.stored_bytes) == (769664, 57344, 4)
    pairs = disk.prepared_pairs(RunDir(out, writer=False))
    steps = disk.optimizer_steps(recipe, pairs)
    assert (pairs, steps) == (417, 53) and json.loads((out / "run.json").read_text())["stages"]["train"]["global_step"] == 53
    assert disk.checkpoints_kept(recipe, steps) == (3, 2) and disk.checkpoints_kept(recipe, None) == (1, 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-40", "checkpoint-53"]
    checkpoint = disk.checkpoint_bytes(recipe, sizes, train_bytes=4)
    assert checkpoint == 57344 * (4 + 8)  # the adapter and two Adam moments, fp32
    assert all(checkpoint <= folder_size(p) <= 1.2 * checkpoint for p in (out / "checkpoints").iterdir())
    adapter = (out / "adapter/adapter_model.safetensors").stat().st_size
    assert disk.trained_bytes(recipe, sizes, 4) <= adapter <= 1.02 * disk.trained_bytes(recipe, sizes, 4)
    model = (out / "model/model.safetensors").stat().st_size
    assert disk.merged_bytes(recipe, sizes) == 769664 * 4 <= model <= 1.01 * disk.merged_bytes(recipe, sizes)

    full = prepared_copy(demo_run, tmp_path / "full")
    sets = ["lora.enabled=false", "train.max_steps=2", "train.save_steps=1", "eval.enabled=false"]
    proc = cli("train", "recipes/demo.yaml", "--output-dir", full, *[x for s in sets for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = load_recipe(ROOT / "recipes/demo.yaml", sets)
    sizes = model_sizes(recipe)
    checkpoint = disk.checkpoint_bytes(recipe, sizes, train_bytes=4)
    assert (sizes.trainable, checkpoint) == (769664, 769664 * 12)  # every weight and two Adam moments, fp32
    saved = sorted((full / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["checkpoint-1", "checkpoint-2"]
    assert all(checkpoint <= folder_size(p) <= 1.02 * checkpoint for p in saved), [folder_size(p) for p in saved]
    assert disk.trained_bytes(recipe, sizes, 4) <= (full / "full/model.safetensors").stat().st_size <= 1.01 * disk.trained_bytes(recipe, sizes, 4)
    need = disk.size_text(2 * checkpoint + disk.trained_bytes(recipe, sizes, 4))
    assert f"[alignpress] disk for train: {full}: at least {need} (2 checkpoints of 8.8 MB; the trained weights 2.9 MB), " in proc.stderr
    assert need == "20.6 MB"


def test_optimizer_states_cover_every_optimizer_transformers_names():
    """Every optimizer transformers accepts is counted with its states, or listed as keeping none
    (factored, low-rank, stateless): a new name in a transformers upgrade fails here."""
    from transformers.training_args import OptimizerNames

    from alignpress.disk import NO_STATE, OPTIMIZER_STATES, optimizer_state_bytes

    assert {o.value for o in OptimizerNames} == set(OPTIMIZER_STATES) | set(NO_STATE)
    assert not set(OPTIMIZER_STATES) & set(NO_STATE)
    cases = {("adamw_torch_fused", 2): 4, ("adamw_torch", 4): 8, ("paged_adamw_8bit", 2): 2, ("adamw_torch_4bit", 4): 1, ("ademamix", 4): 12,
             ("lion_32bit", 2): 2, ("paged_lion_8bit", 4): 1, ("galore_adamw", 2): 0, ("adafactor", 4): 0, ("an_unknown_one", 4): 0}
    assert {k: optimizer_state_bytes(*k) for k in cases} == cases


def test_filesystem_type_reads_mountinfo():
    """A bucket mounted with FUSE is not checked: its free space means nothing. The mount holding a
    path is the longest mount point above it (mount points escape spaces as \\040)."""
    from alignpress.disk import filesystem_type

    mountinfo = "\n".join([
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
        "40 22 0:35 / /outputs rw,nosuid,nodev,relatime shared:20 - fuse.rclone alignpress-me-outputs rw,user_id=0,group_id=0",
        "41 22 0:36 / /mnt/my\\040disk rw,relatime shared:21 - xfs /dev/sdb1 rw",
        "42 22 0:37 / /out rw - tmpfs tmpfs rw",
    ])
    assert filesystem_type(Path("/outputs/phi3-mini-capybara/checkpoints"), mountinfo) == "fuse.rclone"
    assert filesystem_type(Path("/outputs"), mountinfo) == "fuse.rclone"
    assert filesystem_type(Path("/mnt/my disk/run"), mountinfo) == "xfs"
    assert filesystem_type(Path("/outputsx/run"), mountinfo) == "ext4"
    assert filesystem_type(Path("/out"), mountinfo) == "tmpfs"
    assert filesystem_type(Path("/root/.cache/huggingface/hub"), mountinfo) == "ext4"
    assert filesystem_type(Path("/"), "") == ""


def test_a_run_into_the_containers_own_filesystem_is_refused(tmp_path, monkeypatch):
    """`docker run` without a volume for the outputs: the run would train into the container's
    writable layer, which --rm deletes and the next `docker run` does not see. The mountinfo lines
    are those of a podman container on this machine (`podman run -v /tmp/mnt-x:/outputs ...`), with
    the mount points moved under tmp_path (the folders are resolved on this machine's disk).
    tests/test_container.py runs the real image without a volume."""
    from alignpress.disk import check_container_outputs

    monkeypatch.delenv("ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS", raising=False)
    (tmp_path / "outputs").mkdir()
    lower = "lowerdir=/var/lib/containers/storage/overlay/l/SF256IIGAD3HJQYLK6BNMJNH55,upperdir=/var/lib/containers/storage/overlay/88ac/diff"
    container = "\n".join([
        f"82 56 0:40 / / rw,relatime - overlay overlay rw,{lower},workdir=/var/lib/containers/storage/overlay/88ac/work",
        "83 82 0:43 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",
        "91 84 0:39 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=64000k",
        f"85 84 254:0 /tmp/mnt-x {tmp_path}/outputs rw,relatime - ext4 /dev/vda rw,discard",
    ])
    inside = RunDir(tmp_path / "app" / "outputs" / "demo")  # the image's working folder, /app: no --output-dir, no ALIGNPRESS_OUTPUTS
    with pytest.raises(AlignpressError) as caught:
        check_container_outputs(inside, container)
    assert str(caught.value) == (
        f"{inside.root}: the output folder is in this container's own filesystem (overlay at /, no volume mounted there): a new "
        "`docker run` could not resume a killed or failed run from it, and --rm deletes the results. Mount a host folder at "
        "/outputs (docker run -v $PWD/outputs:/outputs ...; runs go to /outputs/<recipe name>) or at --output-dir; "
        "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1 writes into the container anyway")
    assert caught.value.exit_code == 2
    # rootless podman mounts the layer with fuse-overlayfs
    with pytest.raises(AlignpressError, match=r"\(fuse\.fuse-overlayfs at /, no volume"):
        check_container_outputs(inside, container.replace(" - overlay overlay ", " - fuse.fuse-overlayfs fuse-overlayfs "))
    # the mounted volume, a folder not made yet in it, and the volume itself
    for folder in (tmp_path / "outputs" / "phi3", tmp_path / "outputs" / "phi3" / "deeper", tmp_path / "outputs"):
        assert check_container_outputs(RunDir(folder), container) is None
    # a machine's own disk at / (this one's), and no mountinfo (macOS)
    host = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard"
    assert check_container_outputs(inside, host) is None
    assert check_container_outputs(inside, "") is None
    # on purpose (sky/run.sh without a BUCKET: the VM's disk, kept with the cluster)
    monkeypatch.setenv("ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS", "1")
    assert check_container_outputs(inside, container) is None


def test_run_and_train_check_where_the_outputs_land_first(tmp_path, monkeypatch, capsys):
    """The command's wiring, in this process (alignpress.cli.main, what entrypoint.py calls) with
    the container's mountinfo in a file: no container runs in `make test` (`make test-container`
    runs the real image without a volume). Refused before anything loads or is written."""
    from alignpress import disk
    from alignpress.cli import main

    monkeypatch.delenv("ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("82 56 0:40 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n"
                         "83 82 0:43 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n")
    monkeypatch.setattr(disk, "MOUNTINFO", mountinfo)
    out = tmp_path / "out"
    for command in ("run", "train"):
        assert main([command, "recipes/demo.yaml", "--output-dir", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {out}: the output folder is in this container's own filesystem (overlay at /, no volume mounted there): a new "
            "`docker run` could not resume a killed or failed run from it, and --rm deletes the results. Mount a host folder at "
            "/outputs (docker run -v $PWD/outputs:/outputs ...; runs go to /outputs/<recipe name>) or at --output-dir; "
            "ALIGNPRESS_ALLOW_CONTAINER_OUTPUTS=1 writes into the container anyway")
        assert not out.exists()
    # a volume at the output folder's parent: the check passes, and the next one speaks (train needs prepare)
    (tmp_path / "volume").mkdir()
    mountinfo.write_text(mountinfo.read_text() + f"85 82 254:0 /tmp/x {tmp_path}/volume rw,relatime - ext4 /dev/vda rw\n")
    assert main(["train", "recipes/demo.yaml", "--output-dir", str(tmp_path / "volume" / "demo")]) == 2
    assert "stage train needs prepare to be done first" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_home_that_is_not_a_folder_gets_one_in_the_temporary_folder(tmp_path, monkeypatch):
    """`docker run --user 1000:1000`: HOME is / (Docker) or the working folder (podman), which that
    user cannot write. Root writes anywhere, so here HOME is a folder that does not exist, or
    unset (the other ways it is unusable); tests/test_container.py runs the image's demo as uid 1000."""
    import tempfile

    from alignpress.cli import writable_home

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    own = tmp_path / f"alignpress-home-{os.getuid()}"
    for home, said in (("/nonexistent", "/nonexistent"), (None, "unset")):
        if home:
            monkeypatch.setenv("HOME", home)
        else:
            monkeypatch.delenv("HOME")
        assert writable_home() == f"HOME ({said}) is not a folder this user (uid {os.getuid()}) can write: caches and logs go to {own} instead"
        assert os.environ["HOME"] == str(own) and oct(own.stat().st_mode & 0o777) == "0o700"
        # the job's own folders follow it (ALIGNPRESS_HOME unset)
        monkeypatch.delenv("ALIGNPRESS_HOME", raising=False)
        from alignpress.modeling import cache_home

        assert cache_home() == own / ".cache" / "alignpress"
    assert writable_home() is None  # a HOME the user can write stays
    assert os.environ["HOME"] == str(own)
    # that name taken by a link (someone else's, in a shared temporary folder): a folder of its own
    for target in (tmp_path / "elsewhere", tmp_path / "dangling"):
        if own.is_symlink():
            own.unlink()
        else:
            shutil.rmtree(own)
        (tmp_path / "elsewhere").mkdir(exist_ok=True)
        own.symlink_to(target)
        monkeypatch.setenv("HOME", "/nonexistent")
        line = writable_home()
        home = Path(os.environ["HOME"])
        assert home.parent == tmp_path and home.name.startswith(f"alignpress-home-{os.getuid()}-") and home.is_dir() and not home.is_symlink()
        assert line.endswith(f"caches and logs go to {home} instead")


def test_a_cache_folder_that_cannot_be_written_is_refused_at_the_door(tmp_path):
    """HF_HOME where this user cannot write: prepare failed there, and its line blamed the recipe's
    data file ("could not read ...: PermissionError: ... '/cache/hf/datasets'"). Root writes
    anywhere, so here the cache is under a file; tests/test_container.py mounts a root-owned
    folder for uid 1000."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = tmp_path / "out"
    tail = ("point HF_HOME at a folder this user owns, or with `docker run -v HOST:/cache/hf` create HOST first "
            "(Docker makes a missing one, as root's)")
    for command in ("prepare", "run", "train", "evaluate", "export"):
        proc = cli(command, "recipes/demo.yaml", "--output-dir", out, env={"HF_HOME": str(blocker / "hf")})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {blocker}: a file, not a folder: this user (uid {os.getuid()}) cannot make {blocker / 'hf' / 'hub'}, "
            f"where the Hub's downloads go; {tail}")
        assert not out.exists()
    # the datasets library's own cache setting is honoured too
    hub = tmp_path / "hub"
    proc = cli("prepare", "recipes/demo.yaml", "--output-dir", out, env={"HF_HUB_CACHE": str(hub), "HF_DATASETS_CACHE": str(blocker)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {blocker}: a file, not a folder: this user (uid {os.getuid()}) cannot write in {blocker}, where the datasets cache goes; {tail}")


def test_writes_to_a_bucket_mount_land_in_rclones_cache(tmp_path):
    """SkyPilot's MOUNT_CACHED (rclone, --vfs-cache-mode full) keeps each file written in the VM's
    ~/.cache/rclone until it is uploaded: that disk is checked. Other FUSE mounts are not."""
    from alignpress import disk

    for name in ("rclone", "gcs", "local"):
        (tmp_path / name).mkdir()
    mountinfo = "\n".join([
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
        f"40 22 0:35 / {tmp_path}/rclone rw,nosuid,nodev,relatime shared:20 - fuse.rclone alignpress-me-outputs rw,user_id=0,group_id=0",
        f"41 22 0:36 / {tmp_path}/gcs rw,nosuid,nodev,relatime shared:21 - fuse.gcsfuse alignpress-me-outputs rw,user_id=0,group_id=0",
    ])
    cache = disk._existing(Path("~/.cache/rclone").expanduser())
    assert disk.landing(tmp_path / "rclone/phi3/checkpoints", mountinfo) == (cache, " (written first into rclone's cache in ~/.cache/rclone)")
    assert disk.landing(tmp_path / "gcs/phi3", mountinfo) is None
    assert disk.landing(tmp_path / "local/phi3", mountinfo) == (tmp_path / "local", "")


def test_a_stage_command_never_discards_stages_it_does_not_redo(demo_copy):
    """`publish` with new eval settings used to mark evaluate and export pending (the changed section
    feeds evaluate), then stop because export was not done: two finished stages thrown away."""
    before = tree(demo_copy)
    proc = cli("publish", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "eval.generation_rows=8")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {demo_copy}/recipe.resolved.yaml: recipe sections eval changed since the evaluate stage ran, and `publish` "
        "does not redo it: run `evaluate` first, or `run` (it redoes evaluate and the stages after it)")
    assert tree(demo_copy) == before
    # A new gate threshold needs no stage before publish again: the verdict is made again, the card
    # written again, and publish's own gate refuses (the demo gains 0.69, less than 0.9) before it asks
    # the Hub (none answers at this address).
    proc = cli("publish", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "eval.gate_min_gain=0.9", "--set", "publish.repo_id=alice/demo",
               env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_" + "x" * 30, "HF_HUB_OFFLINE": "0"})
    ev = json.loads((demo_copy / "metrics/eval.json").read_text())
    base, aligned = ev["base"]["preference_accuracy"], ev["aligned"]["preference_accuracy"]
    assert proc.returncode == 3  # a refused run, not a mistake in the command
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --set eval.gate_min_gain: field 'eval.gate_min_gain': publish gate: the aligned model does not beat the base on held-out "
        f"preference accuracy by 0.9: {base:.4f} -> {aligned:.4f} (gain {aligned - base:+.4f}). Nothing was pushed (numbers in {demo_copy}/metrics/eval.json)")
    assert statuses(demo_copy)[:4] == ["done"] * 4
    assert "Publish gate failed: the aligned model does not beat the base on held-out preference accuracy by 0.9" in (demo_copy / "model/README.md").read_text()


def test_prepare_again_keeps_what_its_data_did_not_change(demo_copy, tmp_path):
    """prepare run again on a finished folder: a failure keeps the later stages and their records (they
    were marked pending before it ran); the same data leaves them alone; other data moves the old
    checkpoints aside, so training starts over instead of resuming on data it was not trained on."""
    recipe = tmp_path / "recipe" / "demo.yaml"
    (recipe.parent / "data").mkdir(parents=True)
    shutil.copy(ROOT / "recipes/demo.yaml", recipe)
    data = recipe.parent / "data" / "arithmetic-capybara.jsonl"
    good = (ROOT / "recipes/data/arithmetic-capybara.jsonl").read_text()
    data.write_text(good + "not json\n")
    trained = json.loads((demo_copy / "run.json").read_text())["stages"]["train"]

    bad = cli("prepare", recipe, "--output-dir", demo_copy)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert statuses(demo_copy) == ["failed", "done", "done", "done", "done"]
    assert json.loads((demo_copy / "run.json").read_text())["stages"]["train"] == trained

    data.write_text(good)
    same = cli("prepare", recipe, "--output-dir", demo_copy)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "prepared data unchanged (fingerprint" in same.stderr
    assert statuses(demo_copy) == ["done"] * 5

    data.write_text("".join(good.splitlines(keepends=True)[:-60]))
    other = cli("prepare", recipe, "--output-dir", demo_copy)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "prepared data changed: the checkpoints of the old data move to" in other.stderr
    assert statuses(demo_copy) == ["done", "pending", "pending", "pending", "pending"]
    # Training finds no checkpoint to resume (it reads checkpoints/ only) and starts at step 0; the
    # old ones are dropped when it is done, as after `train --restart` (test_train_restart_keeps_...).
    assert (demo_copy / "checkpoints.previous").is_dir() and not (demo_copy / "checkpoints").exists()


def test_a_finished_stage_whose_result_is_gone_runs_again(demo_copy):
    """run.json said done, so `run` skipped the stage: a deleted model/ was reported as the model and
    could not be published, a cut-short eval.json crashed the summary, a deleted adapter/ crashed
    evaluate after the base model loaded. Now such a stage is pending again: `run` redoes it, and a
    stage command that needs it names it."""
    shutil.rmtree(demo_copy / "adapter")
    proc = cli("evaluate", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"[alignpress] train is marked done, but {demo_copy}/adapter/adapter_config.json is missing: it runs again",
        f"error: {demo_copy}: stage evaluate needs the result of train, but {demo_copy}/adapter/adapter_config.json is missing: "
        "run `train` (or `run`, which redoes it)"]
    shutil.rmtree(demo_copy / "model")
    ev = demo_copy / "metrics/eval.json"
    ev.write_text(ev.read_text()[:300])
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluate is marked done, but {ev} cannot be read (JSONDecodeError): it runs again" in proc.stderr
    assert (f"export is marked done, but {demo_copy}/model/config.json, {demo_copy}/model/README.md, {demo_copy}/model/tokenizer_config.json "
            "are missing: it runs again") in proc.stderr
    for name in ("train", "evaluate", "export"):
        assert f"== {name}\n" in proc.stderr.replace(" done in", "\n")
    assert (demo_copy / "adapter/adapter_model.safetensors").is_file() and (demo_copy / "model/config.json").is_file()
    assert json.loads(ev.read_text())["aligned"]["preference_accuracy"] > 0.9
    assert statuses(demo_copy) == ["done"] * 5


def test_train_on_a_finished_training_keeps_the_later_stages(demo_copy):
    """It resumed at the last step, trained nothing, wrote the adapter again and sent evaluate, export
    and publish back to pending (and replaced the train record with the resumed one's)."""
    before = tree(demo_copy)
    record = json.loads((demo_copy / "run.json").read_text())["stages"]["train"]
    proc = cli("train", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"train is done (step {record['global_step']}): nothing to train (`train --restart` trains again); the later stages stay as they are"
            in proc.stderr)
    assert statuses(demo_copy) == ["done"] * 5
    assert json.loads((demo_copy / "run.json").read_text())["stages"]["train"] == record
    after = tree(demo_copy)
    assert {k: v for k, v in after.items() if not k.startswith("logs/")} == {k: v for k, v in before.items() if not k.startswith("logs/")}


def test_checkpoints_of_another_recipe_are_not_resumed_when_the_records_are_gone(demo_copy):
    """With run.json and recipe.resolved.yaml moved away, another recipe resumed the old checkpoints (and
    recorded its beta for a model trained with another). Each checkpoint now says what made it."""
    stamp = json.loads((demo_copy / "checkpoints/checkpoint-53/alignpress.json").read_text())
    assert stamp["recipe"]["dpo"]["beta"] == 0.1 and len(stamp["data_fingerprint"]) == 64
    (demo_copy / "run.json").unlink()
    (demo_copy / "recipe.resolved.yaml").unlink()
    before = tree(demo_copy)
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "dpo.beta=0.5", "--set", "train.learning_rate=1e-4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {demo_copy}/checkpoints: checkpoint-53 was trained with another recipe or data (dpo.beta, train.learning_rate differ, "
        "by its alignpress.json): use another --output-dir (on SkyPilot: another --env RUN_NAME), or `train --restart` to train anew here "
        "(the checkpoints move aside)")
    assert tree(demo_copy) == before
    # The same recipe resumes them, as before.
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming training from {demo_copy}/checkpoints/checkpoint-53 (step 53)" in proc.stderr


def test_weights_cut_short_since_export_are_not_published(demo_copy):
    """A model.safetensors cut short after export (a copy that stopped) was pushed and reported
    "pushed", exit 0: the Hub then held a model nobody can load. Its header no longer describes the
    file, so export is pending again: `publish` names it, `run` redoes the merge."""
    from alignpress.cli import weights_problem

    weights = demo_copy / "model/model.safetensors"
    whole = weights.stat().st_size
    assert weights_problem(demo_copy / "model") is None and weights_problem(demo_copy / "adapter") is None
    with weights.open("r+b") as f:
        f.truncate(whole - 1000)
    problem = f"{weights} is cut short or damaged ({whole - 1000:,} bytes; its header does not describe them)"
    assert weights_problem(demo_copy / "model") == problem
    proc = cli("publish", "recipes/demo.yaml", "--output-dir", demo_copy, "--set", "publish.repo_id=alice/cut")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {demo_copy}: stage publish needs the result of export, but {problem}: "
                                                    "run `export` (or `run`, which redoes it)")
    assert json.loads((demo_copy / "run.json").read_text())["stages"]["export"]["status"] == "pending"  # said so above
    proc = cli("run", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== export done" in proc.stderr and "== train: already done, skipping" in proc.stderr
    assert weights.stat().st_size == whole and weights_problem(demo_copy / "model") is None
    # A shard the index names that is gone
    (demo_copy / "model/model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    assert weights_problem(demo_copy / "model") == f"{demo_copy}/model/model-00002-of-00002.safetensors is missing (named in model.safetensors.index.json)"


def test_checkpoints_already_written_are_not_counted_again(demo_run):
    """A resumed training writes only what is not there yet: the checkpoints in the folder come off
    the need (a resume on a nearly full disk was refused); --restart writes them all again."""
    from alignpress import disk
    from alignpress.checks import model_sizes
    from alignpress.recipe import load_recipe
    from alignpress.runstate import RunDir, folder_size

    out = RunDir(demo_run[0], writer=False)
    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    sizes = model_sizes(recipe)
    there = folder_size(out.checkpoints)
    assert there > 0
    resumed = disk.estimate(recipe, out, ["train"], sizes, train_bytes=4, pairs=417)[-1]
    again = disk.estimate(recipe, out, ["train"], sizes, train_bytes=4, pairs=417, restart=True)[-1]
    assert again.need - resumed.need == there
    assert resumed.parts[-1] == f"less {disk.size_text(there)} of checkpoints already there"
    assert not any(p.startswith("less ") for p in again.parts)


def test_set_aside_keeps_the_finished_previous(tmp_path):
    """A second --restart after an interrupted one: `checkpoints.previous` holds the finished run's,
    `checkpoints` the interrupted redo's. The finished ones stay; the redo's go."""
    from alignpress.runstate import RunDir

    run_dir = RunDir(tmp_path)
    finished, redo = tmp_path / "checkpoints.previous" / "checkpoint-53", tmp_path / "checkpoints" / "checkpoint-5"
    finished.mkdir(parents=True)
    (finished / "w").write_text("finished")
    redo.mkdir(parents=True)
    run_dir.set_aside(tmp_path / "checkpoints")
    assert tree(tmp_path) == {"checkpoints.previous/checkpoint-53/w": hashlib.sha256(b"finished").hexdigest()}
    (tmp_path / "metrics.jsonl").write_text("x")
    run_dir.set_aside(tmp_path / "metrics.jsonl")  # nothing aside yet: moved there
    assert (tmp_path / "metrics.jsonl.previous").read_text() == "x" and not (tmp_path / "metrics.jsonl").exists()


def test_prepared_data_an_evaluation_or_a_tokenizer_gone_since_are_not_trusted(demo_copy):
    """Each was trusted as done: training `resumed` on a cut-short train.jsonl and trained no step;
    without eval.jsonl every run failed in evaluate; an eval.json of `{}` was pushed as no evaluation;
    a model folder without its tokenizer was pushed. Each is now pending again: `run` redoes it, and a
    stage command that needs it names it."""
    d = demo_copy
    lines = (d / "data/train.jsonl").read_text().splitlines(keepends=True)
    (d / "data/train.jsonl").write_text("".join(lines[:200]))
    proc = cli("train", "recipes/demo.yaml", "--output-dir", d)
    changed = f"{d}/data/train.jsonl or eval.jsonl changed since prepare wrote them (sha256 differs from run.json data_fingerprint)"
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-2:] == [
        f"[alignpress] prepare is marked done, but {changed}: it runs again",
        f"error: {d}: stage train needs the result of prepare, but {changed}: run `prepare` (or `run`, which redoes it)"]
    fingerprint = json.loads((d / "run.json").read_text())["data_fingerprint"]
    assert cli("prepare", "recipes/demo.yaml", "--output-dir", d).returncode == 0
    assert json.loads((d / "run.json").read_text())["data_fingerprint"] == fingerprint  # the same data again
    assert len((d / "data/train.jsonl").read_text().splitlines()) == len(lines)
    (d / "data/eval.jsonl").unlink()
    proc = cli("train", "recipes/demo.yaml", "--output-dir", d)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {d}: stage train needs the result of prepare, but {d}/data/eval.jsonl is missing: run `prepare` (or `run`, which redoes it)")
    assert cli("prepare", "recipes/demo.yaml", "--output-dir", d).returncode == 0

    ev = d / "metrics/eval.json"
    ev.write_text("{}")
    proc = cli("export", "recipes/demo.yaml", "--output-dir", d)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {d}: stage export needs the result of evaluate, but {ev} holds no evaluation (no n_pairs, base and aligned): "
        "run `evaluate` (or `run`, which redoes it)")

    (d / "model/tokenizer.json").unlink()
    proc = cli("run", "recipes/demo.yaml", "--output-dir", d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"export is marked done, but {d}/model has no tokenizer vocabulary (tokenizer.json, tokenizer.model, vocab.json, vocab.txt): "
            "it runs again") in proc.stderr
    assert (d / "model/tokenizer.json").is_file() and json.loads(ev.read_text())["n_pairs"] == 90


def test_a_refused_command_changes_nothing(demo_copy):
    """A recipe change (export.dtype) and a data file changed since prepare: the refusal of the data
    came after the change had been applied, so the refused command left a new run id and export and
    publish pending, and the next run redid the merge for the unchanged recipe under a new Hub tag."""
    d = demo_copy
    manifest = json.loads((d / "run.json").read_text())
    (path, record), = manifest["inputs"]["data"].items()
    record["size"] += 1  # as if the file had grown since prepare read it
    (d / "run.json").write_text(json.dumps(manifest, indent=2))
    before = {p: (d / p).read_bytes() for p in ("run.json", "recipe.resolved.yaml", "model/README.md")}
    proc = cli("run", "recipes/demo.yaml", "--output-dir", d, "--set", "export.dtype=bfloat16", "--set", "card.tags=[other]")
    assert proc.returncode == 2
    assert f"{path} changed since this folder's prepare stage read it" in proc.stderr.strip().splitlines()[-1]
    assert {p: (d / p).read_bytes() for p in before} == before
    assert "export changed" not in proc.stderr and "written again" not in proc.stderr


def test_an_empty_checkpoints_folder_is_not_a_started_training(tmp_path, tiny_phi3):
    """A kill before the first save leaves checkpoints/ empty: a training field may still change."""
    from test_inputs import prepared

    recipe, _, _, out = prepared(tmp_path, tiny_phi3)
    (out / "checkpoints").mkdir()
    proc = cli("prepare", recipe, "--output-dir", out, "--set", "train.learning_rate=3e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[alignpress] recipe sections train changed before the stages that use them ran" in proc.stderr.splitlines()
    (out / "checkpoints/checkpoint-5").mkdir()
    proc = cli("prepare", recipe, "--output-dir", out, "--set", "train.learning_rate=1e-4")
    assert proc.returncode == 2 and "holds a run of a different recipe (train.learning_rate differs)" in proc.stderr


def test_a_killed_restart_that_replaced_a_result_keeps_its_stages_pending(demo_copy):
    """`evaluate --restart` killed after it wrote eval.json, before the stage was marked done: the
    undo put the old records back ("as it was") next to the new eval.json, and the next run pushed a
    card with the killed evaluation's numbers. Results written since the restart began now keep its
    records. And the advice after an interrupted --restart drops --restart, which would start over."""
    import argparse

    from alignpress.cli import _again, _before_restart, _restart, _undo_restart
    from alignpress.runstate import RunDir

    run_dir = RunDir(demo_copy)
    before = _before_restart(run_dir)
    _restart(run_dir, "evaluate")
    assert _undo_restart(run_dir, before, "evaluate") is True  # nothing written yet: put back
    assert json.loads((demo_copy / "run.json").read_text()) == before["manifest"]

    before = _before_restart(run_dir)
    _restart(run_dir, "evaluate")
    ev = demo_copy / "metrics/eval.json"
    ev.write_text(ev.read_text())  # the killed evaluation's file
    assert _undo_restart(run_dir, before, "evaluate") is False
    stages = json.loads((demo_copy / "run.json").read_text())["stages"]
    assert [stages[s]["status"] for s in ("train", "evaluate", "export", "publish")] == ["done", "pending", "pending", "pending"]

    args = argparse.Namespace(command="run", restart=True)
    args.run_dir = types.SimpleNamespace(current_stage="evaluate")
    assert _again(args) == "run the same command without --restart to go on: finished stages are kept"
    args.restart_undone = True
    assert _again(args) == "the folder is as it was before --restart: run the same command again to redo it"
    args.restart, args.run_dir.current_stage = False, "train"
    assert _again(args) == "run the same command again to go on: finished stages are kept, and training resumes from its newest checkpoint"


@pytest.fixture
def environment_restored():
    """cli.main run in this process sets variables for the libraries it drives (TENSORBOARD_LOGGING_DIR,
    PYTORCH_ALLOC_CONF): put back afterwards, or the later tests' subprocesses in this worker inherit
    them (test_spot's run wrote its TensorBoard files into this test's folder)."""
    before = dict(os.environ)
    yield
    for name in set(os.environ) - set(before):
        del os.environ[name]
    os.environ.update(before)


CUDA_OOM = ("CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 39.38 GiB of which 1.06 GiB is free. Including "
            "non-PyTorch memory, this process has 38.31 GiB memory in use. Of the allocated memory 36.12 GiB is allocated by PyTorch, and "
            "1.67 GiB is reserved by PyTorch but unallocated.")


def test_out_of_gpu_memory_in_training_says_how_to_go_on(tmp_path, capsys, monkeypatch, environment_restored):
    """An out-of-memory error hours into training used to end on torch's message and a traceback
    file. A stand-in, as no GPU runs here: torch's own OutOfMemoryError, with the text CUDA's
    allocator gives, raised by the 12th training step of the real demo training (checkpoints every 5).
    Then the way the line names: the same command with every layer recomputed resumes from the
    checkpoint and finishes."""
    from trl import DPOTrainer

    from alignpress.cli import main

    out = tmp_path / "demo"
    steps, original = [], DPOTrainer.training_step

    def step(self, *args, **kwargs):
        steps.append(self.state.global_step)
        if len(steps) == 12:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DPOTrainer, "training_step", step)
        assert main(["run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "train.save_steps=5"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "error: recipes/demo.yaml: field 'train.gradient_checkpointing': CUDA out of memory at step 11 (1.95 GiB more asked, 1.06 GiB of "
        "39.38 GiB free; no layer recomputed (gradient checkpointing off)): run again with --set train.gradient_checkpointing=true "
        "--set train.checkpointed_layers=null (every layer recomputes: the least activation memory, about a quarter slower with LoRA); "
        "a resumed run may change it, and resumes from checkpoint-10")
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-10"
    assert json.loads((out / "run.json").read_text())["stages"]["train"]["status"] == "failed"

    assert main(["train", "recipes/demo.yaml", "--output-dir", str(out), "--set", "train.save_steps=5",
                 "--set", "train.gradient_checkpointing=true", "--set", "train.checkpointed_layers=null"]) == 0
    err = capsys.readouterr().err
    assert f"resuming training from {out / 'checkpoints' / 'checkpoint-10'} (step 10)" in err
    train = json.loads((out / "run.json").read_text())["stages"]["train"]
    assert (train["status"], train["global_step"], train["resumed_from_step"], train["systems"]["gradient_checkpointing"]) == ("done", 53, 10, True)


def test_out_of_gpu_memory_in_the_reference_pass_names_its_batch(tmp_path, capsys, monkeypatch, environment_restored):
    """TRL runs the precompute pass while the trainer is built, before the first step. The same
    stand-in (torch's error with CUDA's text, no GPU here) raised by the pass of the real demo; then
    the command the line names, which starts over and finishes."""
    from trl import DPOTrainer

    from alignpress.cli import main

    out = tmp_path / "demo"
    args = ["run", "recipes/demo.yaml", "--output-dir", str(out), "--set", "dpo.precompute_ref_log_probs=true"]

    def fail(self, dataset, name, batch_size):
        raise torch.OutOfMemoryError(CUDA_OOM)

    with monkeypatch.context() as patch:
        patch.setattr(DPOTrainer, "_precompute_ref_logps", fail)
        assert main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: recipes/demo.yaml: field 'dpo.precompute_ref_batch_size': CUDA out of memory in the reference log-prob pass before "
        "training (1.95 GiB more asked, 1.06 GiB of 39.38 GiB free; 8 pairs a forward): run again with --set "
        "dpo.precompute_ref_batch_size=4 and --restart (nothing was trained yet)")
    assert main([*args, "--set", "dpo.precompute_ref_batch_size=4", "--restart"]) == 0
    train = json.loads((out / "run.json").read_text())["stages"]["train"]
    assert (train["status"], train["global_step"], train["systems"]["precompute_ref_batch_size"]) == ("done", 53, 4)


def test_out_of_gpu_memory_in_evaluate_names_its_batch(tmp_path, capsys, monkeypatch, environment_restored):
    """The evaluate stage's generations (the same stand-in: torch's error with CUDA's text, no GPU
    here); eval.batch_size is evaluate's own, so `run` with a smaller one goes on from the trained
    adapter: training is not done again."""
    from alignpress import evaluate
    from alignpress.cli import main

    out = tmp_path / "demo"
    args = ["run", "recipes/demo.yaml", "--output-dir", str(out)]

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "generate_ids", fail)
        assert main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: recipes/demo.yaml: field 'eval.batch_size': CUDA out of memory in the evaluate stage (1.95 GiB more asked, 1.06 GiB "
        "of 39.38 GiB free; 8 sequences a forward): run again with --set eval.batch_size=4 (training and its adapter are kept)")
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert (stages["train"]["status"], stages["evaluate"]["status"]) == ("done", "failed")
    assert main([*args, "--set", "eval.batch_size=4"]) == 0
    err = capsys.readouterr().err
    assert "== train: already done, skipping" in err and "== evaluate done in" in err
    assert json.loads((out / "metrics/eval.json").read_text())["aligned"]["behaviour"] is not None


def test_out_of_gpu_memory_in_export_merges_on_the_cpu_instead(demo_copy, capsys, monkeypatch, environment_restored):
    """Export on a GPU that ran short (stand-ins, no GPU here: the device said to be cuda with room to
    spare, and the merge there raising torch's error with CUDA's text): the same merge runs on the
    CPU, in the same command, and the stage is done."""
    from alignpress import export
    from alignpress.cli import main

    real, devices = export.merge_and_save, []

    def merge(*args):
        devices.append(args[-1])
        if args[-1] == "cuda":
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args)

    monkeypatch.setattr(export, "pick_device", lambda recipe: "cuda")
    monkeypatch.setattr(export, "gpu_free_bytes", lambda: 40 * 2**30)
    monkeypatch.setattr(export, "merge_and_save", merge)
    assert main(["export", "recipes/demo.yaml", "--output-dir", str(demo_copy), "--restart"]) == 0
    err = capsys.readouterr().err
    assert devices == ["cuda", "cpu"]
    assert "[alignpress] export merges on the GPU: the float32 model and its probe need about 1.0 GB, 40.0 GB free\n" in err
    assert ("[alignpress] CUDA out of memory in the export stage (1.95 GiB more asked, 1.06 GiB of 39.38 GiB free): merging on the "
            "CPU instead (slower, the same result)\n") in err, err[-2000:]
    stage = json.loads((demo_copy / "run.json").read_text())["stages"]["export"]
    assert (stage["status"], stage["device"]) == ("done", "cpu") and stage["merge_max_abs_diff"] < 1e-4


def test_out_of_gpu_memory_with_every_layer_recomputed_names_the_batch():
    from alignpress.recipe import load_recipe
    from alignpress.train import out_of_memory, precompute_out_of_memory

    recipe = load_recipe(ROOT / "recipes/phi3-mini-capybara.yaml")
    error = out_of_memory(torch.OutOfMemoryError(CUDA_OOM), recipe, {"gradient_checkpointing": True, "checkpointed_layers": 32, "layers": 32},
                          480, Path("/outputs/phi3/checkpoints/checkpoint-400"))
    assert (error.exit_code, str(error)) == (1, (
        f"{recipe.source}: field 'train.per_device_train_batch_size': CUDA out of memory at step 480 (1.95 GiB more asked, 1.06 GiB of "
        "39.38 GiB free; every layer recomputed (gradient checkpointing on)): lower train.per_device_train_batch_size (raising "
        "train.gradient_accumulation_steps to keep the pairs per step) or data.filters.max_tokens, and run with --restart (a checkpoint "
        "resumes only with the batches it was trained on)"))
    partial = out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), recipe, {"gradient_checkpointing": True, "checkpointed_layers": 8, "layers": 32}, 3, None)
    assert str(partial).endswith("CUDA out of memory at step 3 (at most 8 of 32 layers recomputed (gradient checkpointing)): run again with "
                                 "--set train.gradient_checkpointing=true --set train.checkpointed_layers=null (every layer recomputes: the "
                                 "least activation memory, about a quarter slower with LoRA); a resumed run may change it, and starts again "
                                 "from step 0 (no checkpoint yet)")
    one = precompute_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), recipe, 1)
    assert str(one) == (f"{recipe.source}: field 'dpo.precompute_ref_log_probs': CUDA out of memory in the reference log-prob pass before "
                        "training (torch gave no numbers; 1 pair a forward): lower data.filters.max_tokens (the longest pairs), or set "
                        "dpo.precompute_ref_log_probs: false (the reference runs with each step), and run with --restart")
    from alignpress.evaluate import out_of_memory as evaluate_out_of_memory

    single = load_recipe(ROOT / "recipes/demo.yaml", ["eval.batch_size=1"])
    assert str(evaluate_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), single)) == (
        f"{single.source}: field 'eval.max_new_tokens': CUDA out of memory in the evaluate stage (torch gave no numbers; 1 sequence "
        "a forward): run again with a lower eval.max_new_tokens (now 24; training and its adapter are kept)")
    from alignpress.evaluate import judge_out_of_memory

    judged = load_recipe(ROOT / "recipes/demo.yaml", ["eval.judge=OpenAssistant/reward-model-deberta-v3-large-v2"])
    assert str(judge_out_of_memory(torch.OutOfMemoryError(CUDA_OOM), judged)) == (
        f"{judged.source}: field 'eval.judge': CUDA out of memory scoring answers with the judge OpenAssistant/reward-model-deberta-v3-large-v2 "
        "(1.95 GiB more asked, 1.06 GiB of 39.38 GiB free; one answer at a time, alone on the GPU): name a smaller judge, or set "
        "eval.judge: null, and run again (training and its adapter are kept)")
