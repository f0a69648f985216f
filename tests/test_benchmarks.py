"""Smoke test of the benchmark scripts, so they never rot, and checks of their shared machinery.

Every script in ``benchmarks.all.BENCHMARKS`` that accepts ``--quick`` and ``--out`` runs once, in
its tiny configuration, into a temporary folder (one thread: on a loaded 2-core machine that is
the fast and steady setting); its JSON must hold the documented fields. Then ``benchmarks.all
--no-run`` must rewrite a copy of the README from those results.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import common
from benchmarks.all import BENCHMARKS, accepted_flags

REPO = common.REPO
# Fields every result carries (see benchmarks.common.metadata), then each benchmark's own.
META_FIELDS = ("date", "machine", "machine_summary", "threads", "versions", "repeats", "quick")
MACHINE_FIELDS = ("cpu", "cores", "clock_ghz", "flop_per_cycle", "peak_gflops")
FIELDS = {
    "layers": ("batch_size", "frameworks", "rows", "timings"),
    "epoch": ("recipe", "dataset", "train_images", "contenders"),
    "inference": ("forward_flops_per_image", "peak_flops_for_threads", "rows"),
    "data_epoch": ("dataset", "train_images", "reference", "rows"),
    "time_to_accuracy": ("dataset", "recipes", "thresholds", "clock", "headline", "table", "runs"),
}
ROW_FIELDS = {
    "layers": ("layer", "pass", "torch", "numpy"),
    "inference": ("framework", "batch_size", "images_per_second", "speed_vs_torch", "share_of_peak"),
    "data_epoch": ("contender", "epoch_seconds", "share_of_training_epoch", "timing"),
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Run every benchmark that has --quick and --out into one folder, two at a time (each on one
    thread, so together they fill the 2 cores); name -> its JSON, or why it was not run."""
    out = tmp_path_factory.mktemp("benchmarks")
    results, runnable = {"out": out}, []
    for name in BENCHMARKS:
        flags = accepted_flags(name)
        missing = [flag for flag in ("--quick", "--out") if flag not in (flags or ())]
        if flags is None or missing:
            results[name] = f"benchmarks.{name} " + ("does not run" if flags is None else
                                                     f"lacks {' and '.join(missing)}")
        else:
            runnable.append(name)

    def run(name):
        return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--threads", "1",
                               "--out", str(out)], cwd=REPO, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        completed = dict(zip(runnable, pool.map(run, runnable)))
    for name, process in completed.items():
        assert process.returncode == 0, f"benchmarks.{name} --quick failed:\n{process.stderr[-3000:]}"
        assert "|---" in process.stdout, f"benchmarks.{name} printed no Markdown table"
        results[name] = json.loads((out / f"{name}.json").read_text())
    return results


def check_result(quick_results, name):
    result = quick_results[name]
    if isinstance(result, str):
        pytest.skip(result)
    assert result["benchmark"] == name and result["meta"]["quick"] is True
    assert set(META_FIELDS) <= result["meta"].keys()
    assert set(MACHINE_FIELDS) <= result["meta"]["machine"].keys()
    assert result["meta"]["threads"]["requested"] == 1
    assert {"numpy", "torch"} <= result["meta"]["versions"].keys()
    assert "|---" in result["markdown"]
    assert set(FIELDS.get(name, ())) <= result.keys()
    for row in result.get("rows", []) if name in ROW_FIELDS else []:
        assert set(ROW_FIELDS[name]) <= row.keys(), row


@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_run_writes_documented_fields(quick_results, name): check_result(quick_results, name)


def test_epoch_times_every_phase(quick_results):
    result = quick_results["epoch"]
    for name, entry in result["contenders"].items():
        if name.startswith("numpylenet"):
            phases = entry["phases"]
            assert sum(phases.values()) == pytest.approx(entry["median_seconds"], rel=0.05), name
            assert 0 <= min(entry["test_accuracy"]) <= 1


def test_time_to_accuracy_curves_are_consistent(quick_results):
    """Each run's curve: clock and images only grow, evaluation points end at the run's end, and
    the times to each threshold are the first points at or above it."""
    result = quick_results["time_to_accuracy"]
    if isinstance(result, str):
        pytest.skip(result)
    assert {run["recipe"] for run in result["runs"]} == {"speedrun", "default"}
    for run in result["runs"]:
        curve = run["curve"]
        seconds, images = [p["seconds"] for p in curve], [p["images"] for p in curve]
        assert seconds == sorted(seconds) and images == sorted(images) and len(curve) == 3
        assert curve[-1]["images"] == run["images"] == 320 and seconds[-1] == run["train_seconds"]
        for key, reached in run["time_to"].items():
            first = next((p["seconds"] for p in curve if 100 * p["test_accuracy"] >= float(key) - 1e-9), None)
            assert reached == first
    assert "CPU core" in result["headline"] and result["headline"] in result["markdown"]


def test_all_rewrites_readme_between_markers(quick_results, tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    subprocess.run([sys.executable, "-m", "benchmarks.all", "--no-run", "--out", str(quick_results["out"]),
                    "--readme", str(readme)], cwd=REPO, check=True, capture_output=True)
    text = readme.read_text()
    for name in BENCHMARKS:
        block = re.search(rf"<!-- benchmarks:{name} -->\n(.*?)<!-- /benchmarks:{name} -->", text, re.S)
        assert block, f"README has no markers for {name}"
        if isinstance(quick_results[name], dict):
            assert quick_results[name]["markdown"].strip() in block.group(1)
            assert quick_results[name]["meta"]["machine_summary"] in block.group(1)


# ---------------------------------------------------------------- the shared machinery


def isa(flags): return common.vector_isa(set(flags.split()))
def test_isa_avx512_counts_as_two_256_bit_fma_units(): assert isa("sse avx avx2 fma avx512f") == ("AVX-512", 32)
def test_isa_avx2_fma(): assert isa("sse avx avx2 fma") == ("AVX2+FMA", 32)
def test_isa_avx2_without_fma(): assert isa("sse avx avx2") == ("AVX", 16)
def test_isa_sse(): assert isa("sse sse2") == ("SSE", 8)


def test_peak_is_cores_times_clock_times_flop():
    machine = common.detect_machine(clock_ghz=2.5, flop_per_cycle=32)
    assert machine.peak_gflops == pytest.approx(machine.cores * 2.5 * 32)
    assert machine.peak_gflops_for(1) == pytest.approx(2.5 * 32)


def test_training_flops_match_the_hand_count():
    # Multiply-adds per image, counted by hand from the layer shapes:
    # conv1 6x28x28 outputs x 25, conv2 16x10x10 x 150, conv3 120 x 400, fc1 84 x 120, fc2 10 x 84.
    macs = 117_600 + 240_000 + 48_000 + 10_080 + 840
    assert common.forward_flops_per_image() == 2 * macs
    # Training: forward + weight gradients + input gradients, except conv1's input gradient.
    assert common.training_flops_per_image() == 3 * 2 * macs - 2 * 117_600


def test_interleaved_timings_run_round_robin():
    calls = []
    timings = common.interleaved_timings({name: (lambda name=name: calls.append(name)) for name in "abc"},
                                         repeats=3, warmup=0)
    assert "".join(calls) == "abc" "bca" "cab"
    assert all(len(timing.seconds) == 3 for timing in timings.values())


def test_markdown_table_shape():
    assert common.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---:|", "| 1 | 2 |"]
