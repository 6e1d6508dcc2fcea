"""Shared fixtures: synthetic datasets in the real folder layouts, a working directory per
test (the project writes data/, checkpoints/ and logs/ relative to it, as the original), and
the command to run the entry script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
