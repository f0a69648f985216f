"""``python -m numpylenet.check``: passes on the real code, fails loudly and by name on a broken layer,
runs its torch-free half without torch.

The comparisons themselves are :mod:`numpylenet.compare`, which the core tests use too; here the
point is the tool: its exit status, what it prints and what it names.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BLOCK_TORCH
from numpylenet import check, layers
from numpylenet.backend import numba_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(?P<what>.+?)\s+(?P<against>torch float64|torch float32|finite diff\.|the formula)\s+"
                 r"(?P<shape>\(.*?\))\s+\S+\s+\S+\s+\S+\s+(?P<verdict>OK|NOT OK)$")
HAVE_TORCH = importlib.util.find_spec("torch") is not None
BACKENDS = ["numpy"] + (["numba"] if numba_unavailable_reason() is None else [])
# python -m numpylenet.check where torch cannot be imported; it must not import torch either.
WITHOUT_TORCH = BLOCK_TORCH + """
import runpy
sys.argv = ["numpylenet.check", *sys.argv[1:]]
try:
    runpy.run_module("numpylenet.check", run_name="__main__")
finally:
    assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules), "torch was imported"
"""

pytestmark = pytest.mark.usefixtures("single_thread")


def rows(output: str) -> list[dict]:
    """The report's tensor rows (the lines before the failure summary), parsed."""
    report = output.split("\n\n", 1)[0]
    return [match.groupdict() for line in report.splitlines() if (match := ROW.match(line))]


def run_check(*args: str, program: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(program or ["-m", "numpylenet.check"]), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_check_passes_on_the_real_code():
    """Every group, every truth, both backends, and only OK lines; exit status 0."""
    pytest.importorskip("torch")
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    parsed = rows(result.stdout)
    assert parsed and all(row["verdict"] == "OK" for row in parsed)
    assert result.stdout.rstrip().splitlines()[-1].startswith(f"OK: all {len(parsed)} tensors within tolerance")
    whats = " ".join(row["what"] for row in parsed)
    for group in check.GROUPS:
        assert (group if group != "loss" else "softmax_cross_entropy") in whats, group
    for backend in BACKENDS:
        assert f"LeNet5 relu/avg {backend} grad_conv1.weight" in whats
        assert f"Adam {backend} update 2" in whats and f"SGD {backend} update 2" in whats
    assert {row["against"] for row in parsed} == {"torch float64", "torch float32", "finite diff.", "the formula"}
    for case in check.LAYER_CASES:   # the stride/padding variants each checked against all three truths
        assert {row["against"] for row in parsed if row["what"] == f"{case.label} grad_input"} == {
            "torch float64", "torch float32", "finite diff."}, case.label


def test_check_fails_loudly_naming_the_broken_layer(monkeypatch, capsys):
    """Conv2d's input gradient scaled by 1.001: exit 1, and the failures name Conv2d and the numpy
    LeNet5 built from it, nothing else (the numba backend does not use Conv2d.backward)."""
    pytest.importorskip("torch")
    backward = layers.Conv2d.backward
    monkeypatch.setattr(layers.Conv2d, "backward", lambda self, grad: 1.001 * backward(self, grad))
    assert check.main([]) == 1
    output = capsys.readouterr().out
    failed = [row for row in rows(output) if row["verdict"] == "NOT OK"]
    assert failed and all(row["what"].startswith("Conv2d(") or re.match(r"LeNet5 \w+/\w+ numpy ", row["what"])
                          for row in failed)
    assert {row["what"] for row in failed if row["what"].startswith("Conv2d(")} == {
        f"{case.label} grad_input" for case in check.LAYER_CASES if case.layer is layers.Conv2d}
    assert output.rstrip().splitlines()[-1].startswith(f"NOT OK: Conv2d, LeNet5 ({len(failed)} of ")


def test_check_reports_a_layer_that_raises(monkeypatch, capsys):
    def broken(self, grad):
        raise RuntimeError("backward left unfinished")

    monkeypatch.setattr(layers.ReLU, "backward", broken)
    assert check.main(["--layer", "relu", "--dtype", "float64"]) == 1
    output = capsys.readouterr().out
    assert "ReLU() (raised)" in output and "RuntimeError: backward left unfinished" in output
    verdicts = [line for line in output.splitlines() if line and not line.startswith("(torch not installed")]
    assert verdicts[-1].startswith("NOT OK: ReLU")          # last, but for the note on a missing torch


@pytest.mark.parametrize("name", ["maxpool2d", "MaxPool2d"])
def test_layer_option_checks_that_layer_only(name, capsys):
    assert check.main(["--layer", name, "--dtype", "float64", "--seed", "3"]) == 0
    parsed = rows(capsys.readouterr().out)
    assert parsed and all(row["what"].startswith("MaxPool2d(") for row in parsed)
    assert {row["against"] for row in parsed} == ({"torch float64", "finite diff."}
                                                  if HAVE_TORCH else {"finite diff."})


def test_dtype_option_float32_compares_with_torch_only(capsys):
    pytest.importorskip("torch")
    assert check.main(["--layer", "Linear", "--dtype", "float32"]) == 0
    parsed = rows(capsys.readouterr().out)
    assert {row["against"] for row in parsed} == {"torch float32"}
    assert {row["what"] for row in parsed} == {f"Linear(6, 4) {name}" for name in
                                               ("output", "grad_input", "grad_weight", "grad_bias")}


def test_a_negative_seed_is_a_one_line_error_not_a_broken_layer(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--seed", "-1", "--layer", "relu"])
    assert exit_info.value.code == 2
    assert "--seed" in capsys.readouterr().err


def test_unknown_layer_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--layer", "Conv3d"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown layer 'Conv3d'" in error and "MaxPool2d" in error and "LeNet5" in error


def test_without_torch_runs_the_finite_difference_half():
    result = run_check(program=["-c", WITHOUT_TORCH])
    assert result.returncode == 0, result.stdout + result.stderr
    parsed = rows(result.stdout)
    assert parsed and all(row["verdict"] == "OK" for row in parsed)
    assert {row["against"] for row in parsed} == {"finite diff.", "the formula"}
    assert 'pip install -e ".[reference]"' in result.stdout.splitlines()[1]
    assert 'pip install -e ".[reference]"' in result.stdout.splitlines()[-1]
    for backend in BACKENDS:
        assert any(row["what"] == f"LeNet5 tanh/avg {backend} grad_conv1.weight" for row in parsed)
    # float32 is only ever compared with torch: without it there is nothing to run.
    result = run_check("--dtype", "float32", program=["-c", WITHOUT_TORCH])
    assert result.returncode == 2 and 'pip install -e ".[reference]"' in result.stderr
