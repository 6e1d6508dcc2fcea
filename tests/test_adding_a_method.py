"""The worked example of docs/adding_a_method.md, loaded from the page itself: a new method in
one file is known to the command line, trained by the unchanged Trainer with the exact loss
it declares, and runs end to end through run.main."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainer_helpers import RecordingSGD, TinySegNet, batch, ce, grads_of

import methods
import run
from argparser import build_options, parse_options
from methods import registry
from train import Trainer

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding_a_method.md"
CPU = torch.device("cpu")
OLD, NEW = 4, 2


def example_source():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    [source] = [b for b in blocks if b.startswith("# methods/l2_distill.py")]
    return source


@pytest.fixture
def l2d(monkeypatch):
    """The example family, registered (after the others) for this test only."""
    spec = importlib.util.spec_from_loader("methods.l2_distill", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "methods"
    exec(compile(example_source(), str(DOC), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "methods.l2_distill", module)
    monkeypatch.setattr(registry, "_FAMILIES", registry.families() + [module])
    return module


def test_the_command_line_knows_the_new_method(l2d, capsys):
    opts = parse_options(["--method", "l2d", "--task", "15-5", "--step", "1"])
    assert opts.method == "L2D" and opts.loss_l2 == 10.0
    assert parse_options(["--loss_l2", "3"]).loss_l2 == 3.0
    assert "loss_l2" in methods.fingerprint_keys()
    with pytest.raises(SystemExit) as e:
        run.main(["--loss_l2", "-1"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: --loss_l2 must be at least 0, got -1"
    assert methods.option_ranges()["loss_l2"].text() == "at least 0"   # its OPTION_RANGES


def test_the_trainer_adds_the_declared_term_at_step1_only(l2d):
    model, model_old = TinySegNet([OLD, NEW], seed=1), TinySegNet([OLD], seed=2)
    opts = build_options(["--method", "L2D", "--task", "15-5", "--step", "1", "--no_progress"])
    trainer = Trainer(model, model_old, CPU, opts, classes=[OLD, NEW])
    images, labels = batch(0, OLD + NEW)
    z, _ = model(images)
    with torch.no_grad():
        z_old, _ = model_old(images)
    expected = ce(z, labels) + 10.0 * F.mse_loss(z[:, :OLD], z_old)
    reference = grads_of(expected, list(model.parameters()))
    optim = RecordingSGD(model.parameters())
    result = trainer.train(0, optim, [(images, labels)])
    for got, want in zip(optim.seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    mse = float(F.mse_loss(z[:, :OLD], z_old).detach())
    assert result.terms["l2"] == pytest.approx(10.0 * mse, rel=1e-5)

    step0 = Trainer(TinySegNet([OLD], seed=1), None, CPU,
                    build_options(["--method", "L2D", "--task", "15-5", "--no_progress"]),
                    classes=[OLD])
    assert [type(p).__name__ for p in step0.method.parts] == ["CrossEntropy"]
    assert "l2" not in step0.train(0, RecordingSGD(step0.model.parameters()),
                                   [batch(1, OLD)]).terms


@pytest.mark.slow
def test_the_new_method_runs_end_to_end(l2d, synthetic_voc, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # this test's own setting: the next test gets its own back
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    run.main(["--data_root", str(synthetic_voc), "--dataset", "voc", "--task", "15-5",
              "--step", "all", "--method", "L2D", "--name", "l2d", "--backbone", "resnet18",
              "--no_pretrained", "--crop_size", "32", "--batch_size", "4", "--epochs", "1",
              "--lr", "0.01,0.001", "--num_workers", "0", "--no_progress"])
    logdir = tmp_path / "logs" / "15-5-voc" / "l2d"
    for step in (0, 1):
        doc = json.loads((logdir / "results" / f"step-{step}.json").read_text())
        assert doc["method"] == "L2D" and doc["opts"]["loss_l2"] == 10.0
    records = [json.loads(line) for line in (logdir / "events.jsonl").read_text().splitlines()]
    epochs = {r["step"]: r for r in records if r["event"] == "epoch"}
    assert "l2" not in epochs[0]["losses"] and epochs[1]["losses"]["l2"] > 0
    ckpt = torch.load(tmp_path / "checkpoints/step/15-5-voc_l2d_1.pth", weights_only=False)
    assert ckpt["meta"]["fingerprint"]["loss_l2"] == 10.0
    # --step all: step 0's epoch line estimates the whole sequence too, the last step's not
    ends = [line for line in (logdir / "log.txt").read_text().splitlines()
            if "end of epoch" in line]
    assert len(ends) == 2
    assert re.search(r"step ETA 00:00, all steps ~\d\d:\d\d of training", ends[0])
    assert "all steps" not in ends[1]


def test_the_registration_snippet_keeps_every_family_in_order():
    """Copied literally, the page's snippet must register every existing family (in the
    order that is part of the numbers) and then the new one."""
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
                 if "register(_family)" in b]
    listed = re.search(r"for _family in \((.*?)\):", snippet).group(1).split(", ")
    imported = re.search(r"from \. import (.*)\n", snippet).group(1).split(", ")
    existing = [family.__name__.rsplit(".", 1)[1] for family in registry.families()]
    assert listed == existing + ["l2_distill"]
    assert sorted(imported) == sorted(listed)
