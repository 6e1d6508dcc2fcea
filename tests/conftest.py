"""Shared fixtures: synthetic datasets in the real folder layouts, a working directory per
test (the project writes data/, checkpoints/ and logs/ relative to it, as the original), and
the command to run the entry script.

Tests marked ``iabn`` compare against the compiled In-Place ABN package. Where it is not
built (``make test`` builds it when a C++ compiler exists) they are left out, with one line
in the summary that says so; with ``MIB_REQUIRE_IABN=1`` (CI) a missing package is an
error instead."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


_IABN = {}        # "missing": the compiled package does not import; "left_out": tests left out


def pytest_configure(config):
    from modules.norm import inplace_abn_available
    _IABN["missing"] = not inplace_abn_available()
    if _IABN["missing"] and os.environ.get("MIB_REQUIRE_IABN") == "1":
        raise pytest.UsageError(
            "MIB_REQUIRE_IABN=1 but the compiled inplace_abn package does not import; build "
            "it with 'make iabn' (needs a C++ compiler)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # 'make test' runs one pytest worker per core: one thread each, or they fight
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    needs = [item for item in items if item.get_closest_marker("iabn")]
    if not needs or not _IABN["missing"]:
        return
    config.hook.pytest_deselected(items=needs)
    items[:] = [item for item in items if item not in needs]
    _IABN["left_out"] = len(needs)


def pytest_terminal_summary(terminalreporter, config):
    if not _IABN.get("missing"):
        return
    count = _IABN.get("left_out")
    # under pytest-xdist this process only reports (the workers collect): it knows that the
    # package is missing, not how many tests were left out
    if count is None and not getattr(config.option, "numprocesses", None):
        return            # no test of the kind was collected
    why = ROOT / ".venv" / ".iabn-missing"
    reason = why.read_text().strip() if why.is_file() else "it is not installed"
    what = f"{count} comparisons" if count is not None else "the comparisons"
    terminalreporter.write_line(
        f"left out: {what} against the compiled inplace_abn package ({reason}; 'make iabn' "
        "builds it with a C++ compiler); the pure-PyTorch norm layers are tested in full")


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory):
    """A small VOC-layout tree (PascalVOC12/ under the returned data root)."""
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("voc_data")
    generate("voc", str(root), n_train=64, n_val=24, size=48, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    """A small ADE20K-layout tree (ADEChallengeData2016/ under the returned data root)."""
    from dataset.synthetic import generate
    root = tmp_path_factory.mktemp("ade_data")
    generate("ade", str(root), n_train=64, n_val=24, size=48, seed=0)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run the test inside an empty working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_entry(args, cwd, env=None, timeout=600, entry="run.py", launcher=None):
    """Run ``run.py`` (or another entry script of the project) as a user would."""
    cmd = [sys.executable] + (launcher or []) + [str(ROOT / entry)] + [str(a) for a in args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
