"""A lock per run folder, so that two processes never write one run at the same time: the
sweep tool holds ``sweep.lock`` of a run folder while it trains that run (a second sweep waits),
and ``run.py`` holds ``run.lock`` of its run folder for the whole command (a second ``run.py``
of the same run stops at once). One mechanism, two names: the sweep's ``run.py`` child takes
its own ``run.lock`` while its parent holds ``sweep.lock``.

The lock is a file created atomically (written under a name of its own, then hard-linked to
the lock's name, which fails when that exists) holding its owner: host, pid and
the pid's start time (a recycled pid is not taken for the owner), the ``run.py`` child it
runs, the SLURM job id, and a random token. The owner refreshes the file's time every
``HEARTBEAT_SECONDS``. A lock is *stale*, and taken over, when its owner is gone (killed with
SIGKILL, say):

* on this host: neither the owner process nor its child is alive;
* on another host, in a SLURM job of our own id: our job before SLURM requeued it here;
* on another host otherwise: no heartbeat for ``STALE_SECONDS`` (its processes cannot be
  checked from here).

Taking over a stale lock is done under a second atomic marker (a ``.break`` folder): only one
contender removes the stale file, and only if it still holds the token judged stale, so two
contenders finding the same stale lock cannot both take it.
"""
import contextlib
import json
import os
import socket
import threading
import time
import uuid

import torch

from utils import distributed
from utils.checkpoint import atomic_write_json
from utils.errors import RunError

SWEEP_LOCK = "sweep.lock"
RUN_LOCK = "run.lock"
HEARTBEAT_SECONDS = 30
STALE_SECONDS = 600
BREAK_STALE_SECONDS = 60     # a .break marker older than this was left by a crash


def process_start(pid):
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or None where
    it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid, start=None):
    """True when ``pid`` runs (and, when ``start`` is known, is the process that started then)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass            # another user's process: alive
    now = process_start(pid)
    return start is None or now is None or now == start


def owner_record(child=None):
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "child": child, "child_start": process_start(child) if child else None,
            "job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex}


def describe(owner):
    """``pid 123 on host (SLURM job 456), since ...`` for messages."""
    job = f", SLURM job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('since')}"


class RunLock:
    """The lock ``name`` of run folder ``folder``."""

    def __init__(self, folder, name=SWEEP_LOCK):
        self.path = os.path.join(folder, name)
        self.owner = None            # our record while we hold the lock
        self.taken_over = None       # the stale owner we took the lock from, if any
        self._beat = None

    # --- reading ------------------------------------------------------------------------------
    def holder(self):
        """(owner record, seconds since its last heartbeat) of the lock file, or None."""
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"token": None}, STALE_SECONDS + 1     # unreadable: a crash while writing
        return (owner if isinstance(owner, dict) else {"token": None}), age

    @staticmethod
    def alive(owner, age):
        """True while the owner of a lock may still be training its run."""
        if owner.get("host") == socket.gethostname():
            return pid_alive(owner.get("pid"), owner.get("start")) or \
                pid_alive(owner.get("child"), owner.get("child_start"))
        if owner.get("job") and owner["job"] == os.environ.get("SLURM_JOB_ID"):
            return False       # our own job before it was requeued onto this host
        return age < STALE_SECONDS

    def busy(self):
        """The record of a live owner other than us, or None."""
        found = self.holder()
        if found is None or (self.owner and found[0].get("token") == self.owner["token"]):
            return None
        return found[0] if self.alive(*found) else None

    # --- taking and giving back ---------------------------------------------------------------
    def try_acquire(self):
        """Take the lock if it is free or stale; True when we hold it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            record = owner_record()
            if not self._create(record):
                found = self.holder()
                if found is not None and self.alive(*found):
                    return False
                if found is not None and not self._break(found[0]):
                    return False
                if found is not None:
                    self.taken_over = found[0]
                continue
            self.owner = record
            self._start_heartbeat()
            return True
        return False

    def _create(self, record):
        """Create the lock file holding ``record`` unless it exists; True when we did. The
        record is written to a file of our own first and then hard-linked to the lock's name
        (atomic, and fails when the name exists), so no contender ever reads a lock file
        before its owner is in it (an empty one would be taken for a crash and broken)."""
        own = f"{self.path}.{record['token']}"
        with open(own, "w", encoding="utf-8") as f:
            json.dump(record, f)
        try:
            os.link(own, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(own)

    def acquire(self, poll=5.0, on_wait=None):
        """Take the lock, waiting while a live owner holds it (``on_wait(owner)`` is told
        once who that is)."""
        told = False
        while not self.try_acquire():
            owner = self.busy()
            if owner is not None and on_wait is not None and not told:
                on_wait(owner)
                told = True
            time.sleep(poll)

    def _break(self, stale):
        """Remove a stale lock file under the ``.break`` marker; True when it is gone."""
        marker = self.path + ".break"
        try:
            os.mkdir(marker)
        except FileExistsError:
            try:
                if time.time() - os.stat(marker).st_mtime > BREAK_STALE_SECONDS:
                    os.rmdir(marker)
            except OSError:
                pass
            return False
        try:
            again = self.holder()
            if again is not None and again[0].get("token") == stale.get("token"):
                os.unlink(self.path)
            return True
        finally:
            os.rmdir(marker)

    def set_child(self, pid):
        """Record the run.py process we started: the lock stays alive while it runs, even if
        we are killed."""
        if self.owner is None:
            return
        self.owner = dict(self.owner, child=pid, child_start=process_start(pid))
        atomic_write_json(self.path, self.owner)

    def release(self):
        """Give the lock back (only if it is still ours)."""
        if self.owner is None:
            return
        self._beat.set()
        found = self.holder()
        if found is not None and found[0].get("token") == self.owner["token"]:
            os.unlink(self.path)
        self.owner = None

    def _start_heartbeat(self):
        stop = self._beat = threading.Event()
        token = self.owner["token"]

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                found = self.holder()
                if found is None or found[0].get("token") != token:
                    return          # taken from us (judged stale): nothing more to refresh
                os.utime(self.path)
        threading.Thread(target=beat, daemon=True, name="run-lock-heartbeat").start()


class RunBusyError(RunError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def holding_run_folder(folder, is_main=True, device=None, warn=None):
    """Hold ``run.lock`` of ``folder`` (a run's log folder) for the ``with`` block, on the
    main process; every process stops with ``RunBusyError`` when a live owner holds it. A
    stale lock is taken over, and ``warn(line)`` says whose it was. The folders made for the
    lock are removed again when nothing else was written into them."""
    made = _missing_folders(folder)
    lock = RunLock(folder, RUN_LOCK)
    owner = None
    if is_main:
        try:
            taken = lock.try_acquire()
        except OSError as e:
            raise RunError(f"cannot create {folder}: {e.strerror}; choose another folder "
                           "(--logdir)")
        owner = None if taken else (lock.busy() or {"pid": "?", "host": "?"})
    if distributed.any_process(owner is not None, device or torch.device("cpu")):
        _remove_empty(made)
        if owner is None:
            raise RunBusyError(f"run {folder} is in use by another process")
        raise RunBusyError(f"run {folder} is in use by another run.py ({describe(owner)}); "
                           "wait until it ends, or give another --name")
    if lock.taken_over is not None and warn is not None:
        warn(f"took over the lock of run {folder} from {describe(lock.taken_over)}, "
             "which is no longer running")
    try:
        yield lock
    finally:
        lock.release()
        _remove_empty(made)


def _missing_folders(folder):
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    folder = os.path.abspath(folder)
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _remove_empty(folders):
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return          # not empty (or gone): the run wrote something there
