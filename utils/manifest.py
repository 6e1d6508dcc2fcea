"""The run manifest: which steps of a sequence are finished, with their checkpoint checksum.

It lives in the log dir (``<logdir>/<task>-<dataset>/<name>/manifest.json``) and is written
atomically after a step's test phase; a rerun skips the steps it lists as finished."""
import os
import time

from .checkpoint import (
    CheckpointError,
    atomic_write_json,
    fingerprint_changes,
    read_json,
    sha256_of,
)

MANIFEST_NAME = "manifest.json"


class Manifest:
    def __init__(self, logdir):
        self.path = os.path.join(logdir, MANIFEST_NAME)
        self.data = {"steps": {}}
        if os.path.isfile(self.path):
            self.data = read_json(self.path, "run manifest")
            self.data.setdefault("steps", {})

    def entry(self, step):
        return self.data["steps"].get(str(step))

    def finished(self, step):
        entry = self.entry(step)
        return entry is not None and entry.get("status") == "finished"

    def check_finished_checkpoint(self, step):
        """True when the step is finished and its checkpoint is unchanged since then."""
        entry = self.entry(step)
        if entry is None or entry.get("status") != "finished":
            return False
        path = entry["checkpoint"]
        if not os.path.isfile(path):
            raise CheckpointError(
                f"step {step} is recorded as finished in {self.path} but its checkpoint {path} "
                "is gone; rerun with --resume never to train the step again")
        if sha256_of(path) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} changed since step {step} finished (checksum differs from "
                f"{self.path}); restore it, or rerun with --resume never to train the step again")
        return True

    def check_previous_step(self, step, path, ckpt):
        """Refuse the checkpoint ``path`` (loaded: ``ckpt``) that step ``step`` starts from
        when this run recorded step ``step - 1`` as finished with that file and the file has
        changed since (replaced by another run's, say). A file this manifest does not record
        (the original project's, or one named by --step_ckpt) is not checked."""
        entry = self.entry(step - 1)
        if entry is None or entry.get("status") != "finished" or \
                os.path.abspath(entry["checkpoint"]) != os.path.abspath(path):
            return
        if sha256_of(path) == entry.get("sha256"):
            return
        now = (ckpt.get("meta") or {}).get("fingerprint") or {}
        changes = fingerprint_changes(entry.get("fingerprint") or {}, now)
        what = (f"it was trained with other options: {'; '.join(changes)}" if changes
                else "its checksum differs")
        raise CheckpointError(
            f"previous-step checkpoint {path} changed since step {step - 1} finished ({what}, "
            f"recorded in {os.path.normpath(self.path)}); restore it or retrain it with "
            f"--step {step - 1} --resume never, or start from it as it is with --step_ckpt "
            f"{path}")

    def mark_finished(self, step, checkpoint, summary=None, fingerprint=None):
        self.data["steps"][str(step)] = {
            "status": "finished",
            "checkpoint": checkpoint,
            "sha256": sha256_of(checkpoint),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary": summary or {},
            "fingerprint": fingerprint,
        }
        atomic_write_json(self.path, self.data)
