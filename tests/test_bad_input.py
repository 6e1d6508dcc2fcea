"""Every wrong input of the command line or on disk gives one clear line on stderr, exit
code 1, no traceback (unless --debug), and leaves the files already there untouched."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import run
from conftest import run_entry
from tb_events import scalars
from utils import run_lock

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4",
        "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--no_progress"]


def voc(data_root, *extra):
    return ["--data_root", str(data_root), "--dataset", "voc", "--task", "15-5", *TINY, *extra]


def snapshot(root):
    """Digest of every file that matters (checkpoints, results, manifests, index lists,
    data); text logs may only grow."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("events.") and p.name != "log.txt":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fails_with(argv, message, capsys, root):
    before = snapshot(root)
    with pytest.raises(SystemExit) as e:
        run.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 1, err[-2000:]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_voc):
    """A working directory with step 0 of 15-5 (name A) trained, and its own data copy."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(synthetic_voc, root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run.main(voc("data", "--name", "A", "--step", "0"))
    return root


@pytest.fixture
def in_trained(trained, monkeypatch):
    monkeypatch.chdir(trained)
    return trained


def test_data_root_missing(in_trained, capsys):
    fails_with(voc("nowhere", "--name", "A", "--step", "0", "--resume", "never"),
               "data root nowhere does not exist; get the data with data/download_voc.sh",
               capsys, in_trained)


def test_data_root_with_the_wrong_layout(in_trained, capsys, tmp_path):
    (tmp_path / "ADEChallengeData2016").mkdir()
    fails_with(voc(tmp_path, "--name", "B", "--step", "0"), "PascalVOC12", capsys, in_trained)


def test_split_file_naming_a_missing_image(in_trained, capsys, tmp_path):
    shutil.copytree(in_trained / "data", tmp_path / "d")
    victim = sorted((tmp_path / "d/PascalVOC12/JPEGImages").iterdir())[5]
    victim.unlink()
    fails_with(voc(tmp_path / "d", "--name", "B", "--step", "0", "--index_dir",
                   tmp_path / "idx"), victim.name, capsys, in_trained)


@pytest.mark.slow
def test_corrupt_image_in_the_middle_of_an_epoch_names_the_file(in_trained, capsys, tmp_path):
    shutil.copytree(in_trained / "data", tmp_path / "d")
    for jpg in sorted((tmp_path / "d/PascalVOC12/JPEGImages").iterdir())[20:]:
        jpg.write_bytes(b"this is not a JPEG")
    line = fails_with(voc(tmp_path / "d", "--name", "A", "--step", "1", "--index_dir",
                          tmp_path / "idx", "--num_workers", "1"),
                      "JPEGImages", capsys, in_trained)
    assert ".jpg" in line


def test_step_beyond_the_task(in_trained, capsys):
    fails_with(voc("data", "--name", "A", "--step", "2"),
               "step 2 does not exist in task '15-5' of 'voc'; valid steps: 0..1",
               capsys, in_trained)


def test_previous_step_checkpoint_missing_names_path_and_command(in_trained, capsys):
    line = fails_with(voc("data", "--name", "Z", "--step", "1"),
                      "previous-step checkpoint checkpoints/step/15-5-voc_Z_0.pth does not "
                      "exist", capsys, in_trained)
    assert "--step 0" in line


def _checkpoint_variant(in_trained, name, **changes):
    ckpt = torch.load(in_trained / "checkpoints/step/15-5-voc_A_0.pth", weights_only=False)
    ckpt["meta"].update(changes.pop("meta", {}))
    for k, v in changes.items():
        ckpt[k] = v
    path = in_trained / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change,message", [
    ({"meta": {"task": "19-1"}}, "was made with --task 19-1, this run uses --task 15-5"),
    ({"meta": {"dataset": "ade"}}, "was made with --dataset ade"),
    ({"meta": {"backbone": "resnet50"}}, "was made with --backbone resnet50"),
])
def test_checkpoint_of_another_run(in_trained, capsys, change, message):
    path = _checkpoint_variant(in_trained, "other.pth", **change)
    fails_with(voc("data", "--name", "A", "--step", "1", "--step_ckpt", path), message,
               capsys, in_trained)


def test_checkpoint_with_another_number_of_classes(in_trained, capsys):
    ckpt = torch.load(in_trained / "checkpoints/step/15-5-voc_A_0.pth", weights_only=False)
    # an original-format file (no record of ours) of a 19-1 step 0: 20 classes
    state = dict(ckpt["model_state"])
    state["module.cls.0.weight"] = torch.zeros(20, 256, 1, 1)
    state["module.cls.0.bias"] = torch.zeros(20)
    original = {k: ckpt[k] for k in ("epoch", "optimizer_state", "scheduler_state",
                                     "best_score", "trainer_state")}
    original["model_state"] = state
    torch.save(original, in_trained / "19-1.pth")
    fails_with(voc("data", "--name", "A", "--step", "1", "--step_ckpt", "19-1.pth"),
               "has classifiers for classes per step [20], but step 0 of 15-5-voc needs [16]",
               capsys, in_trained)


def test_checkpoint_of_another_backbone_without_a_record(in_trained, capsys):
    ckpt = torch.load(in_trained / "checkpoints/step/15-5-voc_A_0.pth", weights_only=False)
    ckpt.pop("meta")
    torch.save(ckpt, in_trained / "r18.pth")
    fails_with(voc("data", "--name", "A", "--step", "1", "--step_ckpt", "r18.pth",
                   "--backbone", "resnet34"), "does not fit the model", capsys, in_trained)


def test_test_without_a_trained_checkpoint(in_trained, capsys):
    fails_with(voc("data", "--name", "A", "--step", "1", "--test"),
               "--test: no trained checkpoint for step 1 at checkpoints/step/15-5-voc_A_1.pth",
               capsys, in_trained)


def test_ckpt_that_does_not_exist(in_trained, capsys):
    fails_with(voc("data", "--name", "A", "--step", "0", "--ckpt", "missing.pth"),
               "--ckpt missing.pth does not exist", capsys, in_trained)


def test_imagenet_weights_missing(in_trained, capsys):
    argv = [a for a in voc("data", "--name", "W", "--step", "0") if a != "--no_pretrained"]
    line = fails_with(argv, "ImageNet weights not found: pretrained/resnet18_iabn_sync.pth.tar",
                      capsys, in_trained)
    assert "--no_pretrained" in line


@pytest.mark.parametrize("option", ["--checkpoint_dir", "--logdir"])
def test_folder_that_cannot_be_written(in_trained, capsys, option):
    (in_trained / "a_file").write_text("x")
    fails_with(voc("data", "--name", "A", "--step", "0", "--resume", "never", option,
                   "a_file/sub"), "cannot create a_file/sub", capsys, in_trained)


def test_unfinished_run_with_other_options_is_not_resumed(in_trained, capsys):
    ckpt = torch.load(in_trained / "checkpoints/step/15-5-voc_A_0.pth", weights_only=False)
    ckpt["epoch"] = 0
    ckpt["meta"]["fingerprint"]["lr"] = 0.02
    ckpt["meta"]["fingerprint"]["step"] = 1
    ckpt["meta"]["classes"] = [16, 5]
    (in_trained / "checkpoints/step/15-5-voc_U_1.pth").parent.mkdir(exist_ok=True)
    shutil.copy(in_trained / "checkpoints/step/15-5-voc_A_0.pth",
                in_trained / "checkpoints/step/15-5-voc_U_0.pth")
    torch.save(ckpt, in_trained / "checkpoints/step/15-5-voc_U_1.pth")
    fails_with(voc("data", "--name", "U", "--step", "1"),
               "is an unfinished run with other options (lr: 0.02 -> 0.01", capsys, in_trained)


@pytest.mark.parametrize("argv,message", [
    (["--method", "MiBB"], "unknown method 'MiBB' (did you mean MiB?)"),
    (["--lr_polcy", "poly"], "did you mean --lr_policy?"),
])
def test_unknown_method_or_option_names_the_nearest(in_trained, capsys, argv, message):
    fails_with(voc("data", "--step", "0", *argv), message, capsys, in_trained)


def test_as_a_user_sees_it_one_line_no_traceback_and_debug_shows_it(in_trained):
    out = run_entry(voc("data", "--name", "A", "--step", "1", "--test"), in_trained)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: --test")
    out = run_entry(voc("data", "--name", "A", "--step", "1", "--test", "--debug"), in_trained)
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_finished_step_rerun_with_other_options_is_not_skipped(in_trained, capsys):
    line = fails_with(voc("data", "--name", "A", "--step", "0", "--epochs", "2"),
                      "step 0 of 15-5-voc/A finished with other options (epochs: 1 -> 2)",
                      capsys, in_trained)
    assert "--resume never" in line and "another --name" in line


def test_finished_step_rerun_with_the_same_options_is_skipped(in_trained, capsys):
    before = snapshot(in_trained)
    run.main(voc("data", "--name", "A", "--step", "0"))
    assert "is already finished" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(in_trained).items() if k in before} == before


@pytest.fixture(scope="module")
def trained_pi(trained):
    """Step 0 of 15-5 trained with --method PI (name P), beside name A."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained)
        run.main(voc("data", "--name", "P", "--step", "0", "--method", "PI"))
    return trained


def test_another_regulariser_at_step1_is_one_line(trained_pi, monkeypatch, capsys):
    monkeypatch.chdir(trained_pi)
    fails_with(voc("data", "--name", "P", "--step", "1", "--method", "EWC"),
               "run every step with the same --method", capsys, trained_pi)


def _user_error_classes():
    """Every user-facing error class of the project (its modules imported first; the
    benchmarks have entry points of their own)."""
    import importlib
    from pathlib import Path

    from utils.errors import UserError
    root = Path(run.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in (".venv", "tests", "bench") or path.name.startswith("_"):
            continue
        importlib.import_module(".".join(rel.with_suffix("").parts))
    found, todo = set(), [UserError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


USER_ERRORS = _user_error_classes()


def test_every_known_error_is_a_user_error():
    names = {c.__name__ for c in USER_ERRORS}
    assert {"RunError", "CheckpointError", "OptionError", "TaskError", "DatasetError",
            "NonFiniteLossError", "ResultsError", "NormImplError", "RegularizerError",
            "LossError", "MetricsError"} <= names


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_user_error_is_one_line_through_run_main(in_trained, capsys, monkeypatch, error):
    """Raised in the middle of training (a rerun from scratch of the finished step 0):
    one line, exit code 1, the finished step's files untouched."""
    import train

    def fail(*args, **kwargs):
        raise error(f"simulated {error.__name__}; do what the message says")

    monkeypatch.setattr(train.Trainer, "train", fail)
    fails_with(voc("data", "--name", "A", "--step", "0", "--resume", "never"),
               f"simulated {error.__name__}", capsys, in_trained)


# --- issue 28: the mistakes a new user still met --------------------------------------------
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_same_run_started_twice_stops_the_second_at_once(in_trained, capsys):
    """Row 2: the first run.py holds the run folder's lock (here: this process holds it)."""
    holder = run_lock.RunLock(in_trained / "logs/15-5-voc/A", run_lock.RUN_LOCK)
    assert holder.try_acquire()
    try:
        line = fails_with(voc("data", "--name", "A", "--step", "1"),
                          "run logs/15-5-voc/A is in use by another run.py (pid "
                          f"{os.getpid()} on {socket.gethostname()}", capsys, in_trained)
        assert "another --name" in line
        assert not (in_trained / "checkpoints/step/15-5-voc_A_1.pth").exists()
    finally:
        holder.release()


def test_a_stale_run_lock_of_a_dead_process_is_taken_over_with_a_warning(in_trained, capsys):
    """Row 2: a run.py killed with SIGKILL leaves its lock; the next command takes it over."""
    lock_file = in_trained / "logs/15-5-voc/A" / run_lock.RUN_LOCK
    pid = dead_pid()
    lock_file.write_text(json.dumps({"token": "old", "host": socket.gethostname(),
                                     "pid": pid, "since": "yesterday"}))
    before = snapshot(in_trained)
    run.main(voc("data", "--name", "A", "--step", "0"))     # finished: skipped
    err = capsys.readouterr().err
    assert (f"warning: took over the lock of run logs/15-5-voc/A from pid {pid} on "
            f"{socket.gethostname()}, since yesterday, which is no longer running") in err
    assert "is already finished" in err and not lock_file.exists()
    del before[str(lock_file.relative_to(in_trained))]
    assert {k: v for k, v in snapshot(in_trained).items() if k in before} == before


def test_a_refused_command_leaves_no_new_folder(in_trained, capsys):
    """Row 7: a command that fails before its work starts leaves nothing behind, not even the
    folders its lock needed."""
    fails_with(voc("data", "--name", "Fresh", "--step", "0", "--ckpt", "missing.pth"),
               "--ckpt missing.pth does not exist", capsys, in_trained)
    assert not (in_trained / "logs/15-5-voc/Fresh").exists()


def _copy_of_run_a(in_trained, name):
    """Run ``name``: a copy of A's step 0 (checkpoint and manifest)."""
    ckpt = in_trained / f"checkpoints/step/15-5-voc_{name}_0.pth"
    shutil.copy(in_trained / "checkpoints/step/15-5-voc_A_0.pth", ckpt)
    manifest = json.loads((in_trained / "logs/15-5-voc/A/manifest.json").read_text())
    manifest["steps"]["0"]["checkpoint"] = f"checkpoints/step/15-5-voc_{name}_0.pth"
    (in_trained / f"logs/15-5-voc/{name}").mkdir(parents=True, exist_ok=True)
    (in_trained / f"logs/15-5-voc/{name}/manifest.json").write_text(json.dumps(manifest))
    return ckpt


@pytest.mark.parametrize("change,what", [
    ({"meta": {"fingerprint_lr": 0.05}}, "it was trained with other options: lr: 0.01 -> 0.05"),
    ({"epoch": 7}, "its checksum differs"),
])
def test_previous_step_checkpoint_replaced_since_it_finished(in_trained, capsys, change, what):
    """Row 3: step 0's checkpoint replaced by another run's, then step 1 is run."""
    name = "R" + str(len(what))
    ckpt = _copy_of_run_a(in_trained, name)
    other = torch.load(ckpt, weights_only=False)
    if "meta" in change:
        other["meta"]["fingerprint"] = dict(other["meta"]["fingerprint"], lr=0.05)
    else:
        other.update(change)
    torch.save(other, ckpt)
    line = fails_with(voc("data", "--name", name, "--step", "1"),
                      f"previous-step checkpoint {ckpt.relative_to(in_trained)} changed since "
                      f"step 0 finished ({what}, recorded in logs/15-5-voc/{name}/manifest.json)",
                      capsys, in_trained)
    assert "--step 0 --resume never" in line and "--step_ckpt" in line
    assert not (in_trained / f"checkpoints/step/15-5-voc_{name}_1.pth").exists()


def test_a_failed_test_of_a_finished_run_leaves_its_folder_as_it_was(in_trained, capsys):
    """Row 7: ``--test`` with a damaged ``--ckpt``: no line in log.txt, no TensorBoard file."""
    (in_trained / "damaged.pth").write_bytes(b"not a checkpoint")
    run_folder = in_trained / "logs/15-5-voc/A"
    files = {p.name: p.read_bytes() for p in run_folder.iterdir() if p.is_file()}
    fails_with(voc("data", "--name", "A", "--step", "0", "--test", "--ckpt", "damaged.pth"),
               "cannot load checkpoint damaged.pth", capsys, in_trained)
    assert {p.name: p.read_bytes() for p in run_folder.iterdir() if p.is_file()} == files


def test_a_failure_after_the_work_started_is_written_into_log_txt(in_trained, capsys,
                                                                  monkeypatch):
    """Row 7: the error line is in log.txt too, after the lines of the work done."""
    import train

    def fail(*args, **kwargs):
        raise train.NonFiniteLossError("the training loss is not finite (simulated)")

    monkeypatch.setattr(train.Trainer, "train", fail)
    fails_with(voc("data", "--name", "L", "--step", "0"), "not finite (simulated)", capsys,
               in_trained)
    log = (in_trained / "logs/15-5-voc/L/log.txt").read_text().splitlines()
    assert "Device: cpu" in log[0]
    assert log[-1].endswith("ERROR:rank0: error: the training loss is not finite (simulated); "
                            "no checkpoint of this step was written yet")


def test_two_epochs_as_a_user_reads_them(in_trained, capsys):
    """Rows 9, 10 and 14 on one run (step 1 of a copy of A, 2 epochs, bars on): one 1-based
    numbering in the bar and the log, each save logged once, images/s and the step's ETA in
    the bar and the log line, and the summary on stdout."""
    _copy_of_run_a(in_trained, "E")
    argv = [a for a in voc("data", "--name", "E", "--step", "1", "--epochs", "2",
                           "--print_interval", "1") if a != "--no_progress"]
    run.main(argv)
    out, err = capsys.readouterr()
    log = (in_trained / "logs/15-5-voc/E/log.txt").read_text()
    for text in (err, log):
        assert "=====> epoch 1 of 2" in text and "=====> epoch 2 of 2" in text
        assert re.search(r"end of epoch 2 of 2, .* images/s, step ETA 00:00 of training",
                         text)
        assert "Epoch 0" not in text and "epoch 0" not in text
    assert "epoch 1 of 2:" in err and "epoch 2 of 2:" in err            # the bars
    assert re.search(r"img/s=\d+\.\d, loss=\S+, lr=\S+, step ETA=\d\d:\d\d", err)
    assert log.count("Checkpoint saved") == 2
    assert log.count("(after epoch 1 of 2)") == 1 and log.count("(step finished)") == 1
    records = [json.loads(line) for line in
               (in_trained / "logs/15-5-voc/E/events.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [0, 1]   # 0-based there
    doc = json.loads((in_trained / "logs/15-5-voc/E/results/step-1.json").read_text())
    assert out == (f"step 1 of 15-5-voc/E (no method): test mIoU all "
                   f"{100 * doc['miou_all']:.2f}, old {100 * doc['miou_old']:.2f}, new "
                   f"{100 * doc['miou_new']:.2f}; overall acc {100 * doc['overall_acc']:.2f}, "
                   f"mean acc {100 * doc['mean_acc']:.2f} (%); results: "
                   "./logs/15-5-voc/E/results/step-1.json\n")
    run.main(argv)                        # finished: skipped, the same summary again
    assert capsys.readouterr().out == out
    # row 8: a re-test writes its own tags, beside the training run's
    run.main(argv + ["--test"])
    assert capsys.readouterr().out == out
    folder = in_trained / "logs/15-5-voc/E"
    assert len(scalars(folder, "T_MeanIoU/1")) == 1
    [(x, value)] = scalars(folder, "Retest_T_MeanIoU/1")
    assert x == 1 and value == pytest.approx(doc["mean_iou"], abs=1e-6)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, run_lock.RunError])
def test_an_error_in_the_middle_of_an_epoch_starts_its_own_line(in_trained, capsys,
                                                                 monkeypatch, stop):
    """Row 6: the bar is closed before the message."""
    import train

    def fail(*args, **kwargs):
        raise stop("simulated")

    monkeypatch.setattr(train.Trainer, "_check_finite", fail)
    argv = [a for a in voc("data", "--name", "I", "--step", "0", "--print_interval", "1")
            if a != "--no_progress"]
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == (130 if stop is KeyboardInterrupt else 1)
    message = "interrupted;" if stop is KeyboardInterrupt else "error: simulated"
    before = err[:err.index(message)]
    assert "epoch 1 of 1:" in before                      # the bar was shown
    assert before.split("\n")[-1].split("\r")[-1].strip() == ""
    assert before.endswith(("\n", "\r"))


def test_disk_full_while_a_checkpoint_is_written(in_trained, capsys, monkeypatch):
    """Row 5: torch.save on a full disk raises "RuntimeError: unexpected pos" while handling
    the OSError; one line naming the folder and the space needed, the last good checkpoint
    (step 0's, retrained here with --resume never) intact."""
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial bytes of a checkpoint")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos "
                               "64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    size = (in_trained / "checkpoints/step/15-5-voc_A_0.pth").stat().st_size
    line = fails_with(voc("data", "--name", "A", "--step", "0", "--resume", "never"),
                      f"no space left in {in_trained / 'checkpoints/step'} to write "
                      f"15-5-voc_A_0.pth, which needs about {size / 2 ** 20:.1f} MiB (the size "
                      "of the previous file)", capsys, in_trained)
    assert "MiB free: free some space or choose another folder" in line
