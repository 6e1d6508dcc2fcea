"""``make test`` without the compiled inplace_abn package: the comparisons against it are left
out with one summary line that says why; under ``MIB_REQUIRE_IABN=1`` (CI) the run fails."""
import os
import subprocess
import sys

from conftest import ROOT

# one test that runs anyway, and the three comparisons (20 cases with their parameters)
SELECT = ["tests/test_norm.py::" + name for name in (
    "test_sync_layer_without_process_group_is_iabn", "test_pure_pytorch_equals_package",
    "test_weight_gradient_at_zero_weight_matches_package",
    "test_package_backed_layers_have_the_same_keys_and_numbers")]


def run_pytest(tmp_path, extra=(), env=None):
    # a package that fails to import stands for one that was never built
    hidden = tmp_path / "hidden" / "inplace_abn"
    hidden.mkdir(parents=True, exist_ok=True)
    (hidden / "__init__.py").write_text("raise ImportError('not built')\n")
    full_env = dict(os.environ, PYTHONPATH=str(hidden.parent), OMP_NUM_THREADS="1")
    full_env.pop("MIB_REQUIRE_IABN", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *SELECT, *extra], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_missing_package_leaves_its_comparisons_out_with_one_line(tmp_path):
    proc = run_pytest(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("left out:")]
    assert len(lines) == 1, proc.stdout
    assert "comparisons against the compiled inplace_abn package" in lines[0]
    assert "make iabn" in lines[0]
    count = int(lines[0].split()[2])
    assert count >= 10 and f"1 passed, {count} deselected" in proc.stdout
    assert " skipped" not in proc.stdout


def test_missing_package_is_an_error_where_it_is_required(tmp_path):
    proc = run_pytest(tmp_path, env={"MIB_REQUIRE_IABN": "1"})
    assert proc.returncode != 0
    assert "MIB_REQUIRE_IABN=1 but the compiled inplace_abn package does not import" in \
        proc.stdout + proc.stderr


def test_the_line_is_printed_with_parallel_workers_too(tmp_path):
    proc = run_pytest(tmp_path, extra=["-n", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("left out:")]
    assert len(lines) == 1 and "the comparisons against" in lines[0], proc.stdout
