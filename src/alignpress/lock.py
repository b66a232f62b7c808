"""One writer per output folder: the lock file `<output>/run.lock`.

It must work on a local disk and on a bucket mounted with FUSE (gcsfuse, mountpoint-s3, blobfuse),
where `flock` is missing or only local to one machine. So the lock is a file made with an exclusive
create (O_CREAT|O_EXCL) that names its holder (host, pid, command, a random token, when it started)
and carries a heartbeat the holder's thread rewrites every HEARTBEAT_S seconds.

A lock is taken over when its holder is certainly gone: on the same host when its pid no longer
exists, on any host when its heartbeat is older than timeout() (ALIGNPRESS_LOCK_TIMEOUT seconds,
default 120). A new job that finds a lock whose heartbeat has missed a beat waits for it to go stale
(a preempted spot job, recovered on a new machine, takes over); a lock with a fresh heartbeat is
refused at once. The holder re-reads the file on each beat and stops the process if someone else
holds it now (its own heartbeat stalled past the timeout), so two writers never continue side by side.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import AlignpressError

log = logging.getLogger("alignpress")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
# Under `accelerate launch` the relaunching parent holds the lock; its children inherit the token.
TOKEN_ENV = "ALIGNPRESS_LOCK_TOKEN"


def timeout() -> float:
    return float(os.environ.get("ALIGNPRESS_LOCK_TIMEOUT", "120"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class FolderLock:
    def __init__(self, root: Path, command: str):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.command = command
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The file
    def _payload(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command, "token": self.token, "started": self.started, "heartbeat": time.time()}

    def _read(self) -> dict | None:
        """The holder's record; None when the file is gone. A half-written file reads as {} with its mtime."""
        for _ in range(3):
            try:
                text = self.path.read_text()
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            try:
                data = json.loads(text)
                if isinstance(data, dict):
                    return data
            except json.JSONDecodeError:
                pass
            time.sleep(0.05)
        return {"heartbeat": mtime}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps(self._payload()).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)  # an empty lock (full disk) would block others until the timeout
            raise
        os.close(fd)
        return True

    def _beat(self) -> None:
        text = json.dumps(self._payload())
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            # Some bucket mounts cannot rename: overwrite in place (a reader retries a half-written file).
            self.path.write_text(text)

    def _stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host is gone"
            if holder["pid"] == os.getpid():
                # Our own pid, and not our lock: left by an earlier container of this hostname (whose
                # job was pid 1 too, as `docker run --hostname` gives) or an earlier boot.
                return f"its pid {holder['pid']} is this process's own, so it was left by an earlier container or boot"
        if age > timeout():
            return f"its heartbeat is {age:.0f} s old (more than {timeout():.0f} s)"
        return None

    def _describe(self, holder: dict) -> str:
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
        if holder.get("command"):
            who += f", `{holder['command']}`"
        since = f" since {_stamp(float(holder['started']))}" if "started" in holder else ""
        age = time.time() - float(holder.get("heartbeat", 0))
        return f"{who}{since}, last heartbeat {age:.0f} s ago"

    # Taking and giving back
    def acquire(self) -> None:
        inherited = os.environ.get(TOKEN_ENV) if os.environ.get("ALIGNPRESS_LAUNCHED") == "1" else None
        if inherited:
            holder = self._read() or {}
            if holder.get("token") != inherited:
                raise AlignpressError("the output folder lock of the launching process is gone; run the command again", source=str(self.path))
            self.token = inherited  # the parent beats and releases
            return
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released between our create and read
            reason = self._stale_reason(holder)
            if reason is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                if age <= 2 * HEARTBEAT_S:
                    raise AlignpressError(
                        f"another alignpress process is writing to this folder ({self._describe(holder)}); wait for it, or use another "
                        f"--output-dir (a lock whose heartbeat stops is taken over after {timeout():.0f} s)",
                        source=str(self.root),
                    )
                # It missed a beat: probably gone (a preempted machine). Wait until it is stale or beats again.
                log.warning("output folder lock held by %s: waiting up to %.0f s for it to go stale", self._describe(holder), timeout() - age)
                time.sleep(min(HEARTBEAT_S, max(0.5, timeout() - age + 0.5)))
                continue
            log.warning("taking over the output folder lock from %s: %s", self._describe(holder), reason)
            # Rename, not unlink: of two processes taking over the same stale lock only one rename succeeds.
            aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.token}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue
            aside.unlink(missing_ok=True)
        # Read back: on a mount whose exclusive create is not atomic across machines, the last writer wins.
        time.sleep(0.05)
        holder = self._read() or {}
        if holder.get("token") != self.token:
            raise AlignpressError(f"another alignpress process took the output folder lock at the same time ({self._describe(holder)})", source=str(self.root))
        self.held = True
        os.environ[TOKEN_ENV] = self.token
        self._thread = threading.Thread(target=self._heartbeat, name="alignpress-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is not None and holder.get("token") not in (None, self.token):
                # Someone took over while we stalled: stop at once, before writing anything more.
                sys.stderr.write(f"error: {self.root}: lost the output folder lock to {self._describe(holder)}; stopping\n")  # one write
                sys.stderr.flush()
                os._exit(2)
            try:
                self._beat()
            except OSError as e:
                log.warning("could not refresh the output folder lock %s: %s", self.path, e.strerror or e)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False
        os.environ.pop(TOKEN_ENV, None)
