"""One writer per output folder: a second command is refused, a dead or silent holder is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from alignpress.lock import LOCK_NAME, FolderLock
from conftest import ROOT, cli
from test_lostwork import statuses, tree


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(folder, **fields):
    record = {"host": socket.gethostname(), "pid": dead_pid(), "command": "run recipes/demo.yaml", "token": "planted", "started": time.time() - 3600, "heartbeat": time.time()}
    record.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_fresh_lock_of_another_host_is_respected(demo_copy):
    plant(demo_copy, host="spot-vm-1", pid=4242, started=1795000000.0)
    before = tree(demo_copy)
    proc = cli("publish", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {demo_copy}: another alignpress process is writing to this folder (host spot-vm-1, pid 4242, `run recipes/demo.yaml` since 2026-11-18 11:06:40 UTC, last heartbeat "), last
    assert last.endswith(" s ago); wait for it, or use another --output-dir (a lock whose heartbeat stops is taken over after 120 s)"), last
    assert tree(demo_copy) == before  # lock file included: untouched


def test_lock_of_a_dead_process_is_taken_over(demo_copy):
    record = plant(demo_copy)
    proc = cli("publish", "recipes/demo.yaml", "--output-dir", demo_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the output folder lock from host {record['host']}, pid {record['pid']}, `run recipes/demo.yaml` since " in proc.stderr
    assert f": its process {record['pid']} on this host is gone" in proc.stderr
    assert statuses(demo_copy)[-1] == "done"
    assert not (demo_copy / LOCK_NAME).exists()  # released at the end


def test_a_lock_with_this_processs_own_pid_is_taken_over(tmp_path):
    """A killed container's lock, found by the next container with the same --hostname: the job is
    pid 1 in both, so the holder's pid is alive (it is ours) though the lock is not ours."""

    record = plant(tmp_path, pid=os.getpid(), heartbeat=time.time())
    lock = FolderLock(tmp_path, command="run recipes/demo.yaml")
    assert lock._stale_reason(record) == f"its pid {os.getpid()} is this process's own, so it was left by an earlier container or boot"
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token != "planted"
    finally:
        lock.release()
    assert lock._stale_reason(plant(tmp_path, pid=os.getppid())) is None  # another live process of this host: not stale


def test_silent_lock_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    """A holder on another machine that missed its beats (a preempted spot VM): a recovered job waits
    until the heartbeat is older than the timeout, then takes over."""
    monkeypatch.setenv("ALIGNPRESS_LOCK_TIMEOUT", "25")
    monkeypatch.delenv("ALIGNPRESS_LAUNCHED", raising=False)
    plant(tmp_path, host="spot-vm-1", pid=4242, heartbeat=time.time() - 22)
    lock = FolderLock(tmp_path, "run recipes/demo.yaml")
    started = time.time()
    lock.acquire()
    try:
        assert 2.5 <= time.time() - started < 10
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["token"] == lock.token and held["pid"] == os.getpid()
        # Another taker (same host, live pid, fresh beat) is refused: another process (a lock with this
        # process's own pid and another token is an earlier container's, taken over). The token in the
        # environment hands the lock to the children of an `accelerate launch` relaunch only (ALIGNPRESS_LAUNCHED=1).
        code = f"from pathlib import Path\nfrom alignpress.lock import FolderLock\nFolderLock(Path({str(tmp_path)!r}), 'train x').acquire()"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert other.returncode != 0 and "another alignpress process is writing to this folder" in other.stderr, other.stderr
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused(demo_copy):
    """Two real processes: the second exits 2 naming the first, which finishes intact."""
    out = demo_copy
    data = tree(out / "data")
    first = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), "train", "recipes/demo.yaml", "--output-dir", str(out), "--restart",
                              "--set", "train.num_train_epochs=2", "--set", "train.logging_steps=1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / LOCK_NAME).exists():
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.05)
    second = cli("run", "recipes/demo.yaml", "--output-dir", out)
    still_running = first.poll() is None
    _, err = first.communicate(timeout=600)
    assert still_running, "the first process ended before the second asked for the lock: the test proves nothing"
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}: another alignpress process is writing to this folder (host {socket.gethostname()}, pid {first.pid}, `train recipes/demo.yaml` since "), last
    assert first.returncode == 0, err[-3000:]
    assert statuses(out) == ["done", "done", "pending", "pending", "pending"]
    lines = [json.loads(line) for line in (out / "metrics/train.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 107))  # every step once: nobody else trained here
    assert tree(out / "data") == data
    assert not (out / LOCK_NAME).exists()


def test_holder_that_lost_the_lock_stops(tmp_path):
    """A holder whose lock was taken over (its heartbeat stalled) exits 2 at its next beat instead of
    writing beside the new holder. A fast heartbeat keeps this short."""
    script = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / 'src')!r})
from pathlib import Path
from alignpress import lock
lock.HEARTBEAT_S = 0.2
held = lock.FolderLock(Path({str(tmp_path)!r}), "run recipes/demo.yaml")
held.acquire()
record = json.loads(held.path.read_text())
record.update(host="spot-vm-2", pid=777, token="newer", command="run recipes/demo.yaml", started=1795000000.0)
held.path.write_text(json.dumps(record))
time.sleep(5)
print("still running")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}: lost the output folder lock to host spot-vm-2, pid 777, `run recipes/demo.yaml` since 2026-11-18 11:06:40 UTC, last heartbeat "), last
    assert last.endswith(" s ago; stopping"), last
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "newer"  # the new holder's lock stays


def test_release_leaves_a_lock_another_holder_took_over(tmp_path):
    """A holder that lost its lock (taken over as stale while it hung) must not delete the new
    holder's lock on its way out: a third writer would get in."""
    lock = FolderLock(tmp_path, command="run recipes/demo.yaml")
    lock.acquire()
    path = tmp_path / LOCK_NAME
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "token": "the-new-holder"}))
    lock.release()
    assert json.loads(path.read_text())["token"] == "the-new-holder"
    path.unlink()
    lock2 = FolderLock(tmp_path, command="run recipes/demo.yaml")
    lock2.acquire()
    lock2.release()
    assert not path.exists()  # its own lock it removes
