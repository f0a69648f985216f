"""Smoke test of the benchmark scripts, so they never rot, and checks of their shared machinery.

Every script in ``benchmarks.all.BENCHMARKS`` that accepts ``--quick`` and ``--out`` runs once, in
its tiny configuration, into a temporary folder (one thread: on a loaded 2-core machine that is
the fast and steady setting); its JSON must hold the documented fields. Then ``benchmarks.all
--no-run`` must rewrite a copy of the README from those results.

The machinery is checked against hand-made truths: the peak and FLOP counts against hand counts,
the throughput tables on made-up timings, the peers (torch.compile traced with its "eager" backend,
JAX when installed) against torch eager's losses and logits, and the memory probes against children
and steps that allocate known amounts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks import common, layers, memory, peers
from benchmarks.all import BENCHMARKS, accepted_flags

REPO = common.REPO
# Fields every result carries (see benchmarks.common.metadata), then each benchmark's own.
META_FIELDS = ("date", "machine", "machine_summary", "threads", "versions", "repeats", "quick")
MACHINE_FIELDS = ("cpu", "cores", "clock_ghz", "flop_per_cycle", "peak_gflops")
FIELDS = {
    "layers": ("batch_size", "frameworks", "rows", "timings", "roofline", "peak_flops_for_threads"),
    "epoch": ("recipe", "dataset", "train_images", "contenders"),
    "step": ("training_flops_per_image", "peak_flops_for_threads", "peers", "skipped_peers", "rows"),
    "inference": ("forward_flops_per_image", "peak_flops_for_threads", "peers", "skipped_peers", "rows"),
    "memory": ("runs", "steps"),
    "cold_start": ("command", "runs"),
    "data_epoch": ("dataset", "train_images", "reference", "rows"),
    "time_to_accuracy": ("dataset", "recipes", "thresholds", "clock", "headline", "table", "runs"),
}
ROW_FIELDS = {
    "layers": ("layer", "pass", "torch", "numpy"),
    "step": ("framework", "batch_size", "images_per_second", "median_microseconds", "speed_vs_torch",
             "speed_vs", "share_of_peak"),
    "inference": ("framework", "batch_size", "images_per_second", "median_microseconds", "speed_vs_torch",
                  "speed_vs", "share_of_peak"),
    "data_epoch": ("contender", "epoch_seconds", "share_of_training_epoch", "timing"),
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Run every benchmark that has --quick and --out into one folder, two at a time (each on one
    thread, so together they fill the 2 cores); name -> its JSON, or why it was not run. The
    benchmarks compare with torch: without it (a core-only install) they are skipped."""
    pytest.importorskip("torch")
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
        assert run["threads"]["requested"] == 1 and run["threads"]["numba"] == 1   # what it ran on
        for key, reached in run["time_to"].items():
            first = next((p["seconds"] for p in curve if 100 * p["test_accuracy"] >= float(key) - 1e-9), None)
            assert reached == first
    assert "CPU core" in result["headline"] and result["headline"] in result["markdown"]


def test_all_leaves_a_block_whose_benchmark_has_no_results_alone(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    (tmp_path / "empty").mkdir()
    subprocess.run([sys.executable, "-m", "benchmarks.all", "--no-run", "--out", str(tmp_path / "empty"),
                    "--readme", str(readme)], cwd=REPO, check=True, capture_output=True)
    assert readme.read_text() == (REPO / "README.md").read_text()


def test_all_links_each_figure_from_where_the_document_lies(tmp_path):
    document = tmp_path / "docs" / "tour.md"
    document.parent.mkdir()
    shutil.copy(REPO / "docs" / "tour.md", document)
    subprocess.run([sys.executable, "-m", "benchmarks.all", "--no-run", "--readme", str(document)],
                   cwd=REPO, check=True, capture_output=True)
    links = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", document.read_text())
    figures = [link for link in links if "benchmarks/results" in link]
    assert figures and all((document.parent / link).resolve().is_file() for link in figures), figures


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
    # more threads than cores reach no more than every core
    assert machine.peak_gflops_for(machine.cores + 3) == pytest.approx(machine.peak_gflops)


def test_throughput_and_share_of_peak_come_from_the_median_repeat():
    # Five repeats, median 0.02 s a batch of 10: 500 images/s; at 1,000 FLOP an image that is
    # 5e5 FLOP/s, half of a 1e6 FLOP/s peak (the fastest repeat, 0.01 s, would claim all of it).
    timings = {("torch", 10): common.Timing("torch", [0.04] * 5, 1),
               ("numpylenet (numba)", 10): common.Timing("numpylenet (numba)", [0.01, 0.02, 0.03, 0.02, 0.05], 1)}
    rows = {row["framework"]: row for row in common.throughput_rows(timings, flops_per_image=1000, peak_flops=1e6)}
    ours = rows["numpylenet (numba)"]
    assert ours["images_per_second"] == pytest.approx(500) and ours["share_of_peak"] == pytest.approx(0.5)
    assert ours["median_microseconds"] == pytest.approx(20_000) and rows["torch"]["share_of_peak"] == pytest.approx(0.25)
    assert timings[("numpylenet (numba)", 10)].spread == pytest.approx((0.05 - 0.01) / 0.02)


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



# ---------------------------------------------------------------- throughput tables with peers


def fake_timings(seconds):
    """(framework, batch) -> Timing of one repeat, from {(framework, batch): seconds}."""
    return {key: common.Timing(key[0], [value], 1) for key, value in seconds.items()}


def test_speeds_pair_the_repeats_of_one_round():
    # Rounds 2 and 3 ran at a slow level for both contenders; round 4 caught only numpylenet at
    # it. Each round's ratio is 4 but round 4's; the ratio of the two medians would say 2.
    timings = {("torch", 8): common.Timing("torch", [0.04, 0.08, 0.08, 0.04, 0.04], 1),
               ("numpylenet (numba)", 8): common.Timing("numpylenet (numba)", [0.01, 0.02, 0.02, 0.02, 0.01], 1)}
    ours = [row for row in common.throughput_rows(timings, 1000, 1e6) if row["framework"] != "torch"][0]
    assert ours["speed_vs"] == pytest.approx({"torch": 4.0})
    assert common.paired_speed(common.Timing("a", [0.3, 0.1], 1), common.Timing("b", [0.1], 1)) == pytest.approx(2.0)


def test_throughput_rows_compare_with_every_baseline():
    timings = fake_timings({("torch", 10): 0.04, ("torch.compile", 10): 0.02, ("numpylenet (numba)", 10): 0.01,
                            ("torch", 1): 0.003, ("numpylenet (numba)", 1): 0.001})
    rows = common.throughput_rows(timings, flops_per_image=1000, peak_flops=1e6)
    ours = {(row["framework"], row["batch_size"]): row for row in rows}
    fast = ours["numpylenet (numba)", 10]
    assert fast["speed_vs"] == pytest.approx({"torch": 4.0, "torch.compile": 2.0})
    assert fast["images_per_second"] == pytest.approx(1000) and fast["share_of_peak"] == pytest.approx(1.0)
    assert ours["numpylenet (numba)", 1]["speed_vs"] == pytest.approx({"torch": 3.0})   # no compile at batch 1
    assert [row["framework"] for row in rows[2:]] == ["torch", "torch.compile", "numpylenet (numba)"]
    table = common.throughput_table(rows, cores=2, latency_batch=1)
    assert "| batch | torch eager | torch.compile | numpylenet (numba) |" in table
    assert "| 10 | 250 (25.0%) | 500 (50.0%) | 1,000 (100.0%) |" in table
    assert "| latency at batch 1 (µs per call, median) | 3,000 | - | 1,000 |" in table
    assert "| 10 | numpylenet (numba) | 4.00x | 2.00x |" in table and "| 1 | numpylenet (numba) | 3.00x | - |" in table


def test_set_threads_gives_xla_its_threads(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x intra_op_parallelism_threads=7")
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.setattr(common, "_BLAS_LIMITS", [])
    import numba
    import torch
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        common.set_threads(1)
    finally:
        torch.set_num_threads(before[0]), numba.set_num_threads(before[1])
        common._BLAS_LIMITS[0].restore_original_limits()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_cpu_multi_thread_eigen=true", "intra_op_parallelism_threads=1"]


def test_a_failing_peer_is_skipped_with_one_line(capsys, monkeypatch):
    def broken():
        raise RuntimeError("inductor exploded\nlong traceback")
    monkeypatch.setattr(peers, "jax_unavailable_reason", lambda: "jax is not installed")
    functions, skipped = {"torch": print}, {}
    peers.add_peers(functions, {"torch.compile": broken, "jax": broken}, ["torch.compile", "jax"], skipped, 32)
    assert list(functions) == ["torch"]
    assert skipped == {"torch.compile": "RuntimeError at batch 32: inductor exploded", "jax": "jax is not installed"}
    assert capsys.readouterr().out.splitlines() == [
        "skipping peer torch.compile: RuntimeError at batch 32: inductor exploded",
        "skipping peer jax: jax is not installed"]


def small_batch(batch_size=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.random((batch_size, 1, 32, 32), dtype=np.float32), rng.integers(0, 10, batch_size)


def torch_losses(state, x, labels, steps):
    """The losses of ``steps`` torch eager Adam(1e-3) steps: the truth the peers are held to."""
    import torch
    import torch.nn.functional as F
    model = peers.torch_model(state)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_torch_compiled_step_trains_like_torch_eager():
    """The compiled step's wiring (one function: zero_grad, forward, loss, backward, Adam), traced by
    TorchDynamo with the "eager" backend: inductor would compile for tens of seconds."""
    pytest.importorskip("torch")
    state, (x, labels) = peers.initial_state(seed=3), small_batch()
    step = peers.torch_compiled_step(state, x, labels, backend="eager")
    assert [step().item() for _ in range(3)] == pytest.approx(torch_losses(state, x, labels, 3), rel=1e-5)
    import torch
    logits = peers.torch_compiled_forward(state, x, backend="eager")()
    expected = peers.torch_model(state)(torch.from_numpy(x)).detach().numpy()
    assert logits.numpy() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_jax_forward_and_step_equal_torch():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import torch
    state, (x, labels) = peers.initial_state(seed=5), small_batch()
    expected = peers.torch_model(state)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(peers.jax_logits(peers.jax_params(state), x)), expected, rtol=1e-4, atol=1e-5)
    assert peers.check_jax_forward(state, x) < 1e-4
    step = peers.jax_step(state, x, labels)
    assert [float(step()) for _ in range(3)] == pytest.approx(torch_losses(state, x, labels, 3), rel=1e-4)
    assert np.asarray(peers.jax_forward(state, x)()) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("recipe, overrides, rel", [
    ("default", {}, 1e-5),                                                       # SGD, Nesterov, weight decay
    ("default", {"activation": "tanh", "nesterov": False, "weight_decay": 1e-3}, 1e-5),
    ("speedrun", {"lr": 1e-3}, 1e-4),                                            # Adam
])
def test_the_jax_learner_trains_a_recipe_as_torch_does(recipe, overrides, rel):
    """time_to_accuracy's JAX contender against reference.train's torch learner: same initial
    weights, batches and changing learning rates; losses step by step, logits at the end."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    pytest.importorskip("torch")
    from numpylenet.pipeline import load_splits, training_batches, with_training_statistics
    from numpylenet.recipes import make_config
    from reference.train import TorchLearner

    config = make_config(recipe, dataset="mnist-sample", download=False, limit_train=320, batch_size=32,
                         **overrides)
    splits = load_splits(config)
    config = with_training_statistics(config, splits)
    torch_learner, jax_learner = TorchLearner(config), peers.JaxLearner(config)
    for step, x, y in training_batches(splits.train_images, splits.train_labels, config, 0):
        lr = config.lr * (step + 1) / 10                 # a rate that changes every step, as a schedule's
        assert jax_learner.train_step(x, y, lr) == pytest.approx(torch_learner.train_step(x, y, lr), rel=rel)
    expected = torch_learner.logits(x)
    np.testing.assert_allclose(jax_learner.logits(x), expected, rtol=0, atol=10 * rel * np.abs(expected).max())


def test_a_wrong_jax_model_fails_the_startup_check(monkeypatch):
    jax = pytest.importorskip("jax")
    right = peers.jax_logits
    monkeypatch.setattr(peers, "jax_logits", lambda params, x: right(params, jax.numpy.flip(x, axis=3)))
    with pytest.raises(AssertionError, match="JAX's LeNet-5 forward differs"):
        peers.check_jax_forward(peers.initial_state(), small_batch()[0])


# ---------------------------------------------------------------- the roofline's FLOP counts


def test_layer_flops_match_the_hand_count():
    flops = layers.flops_per_image(batch_size=64, num_parameters=61_706)
    # conv1: 4,704 outputs of 25 products: 2 x 117,600 + bias + ReLU; backward: mask + dW + db, no dx.
    assert flops["conv1", "forward"] == 235_200 + 4_704 + 4_704
    assert flops["conv1", "backward"] == 4_704 + 235_200 + 4_704
    # conv2: 1,600 outputs of 150 products; its backward also forms dL/dinput.
    assert flops["conv2", "backward"] == 1_600 + 480_000 + 1_600 + 480_000
    assert flops["pool1", "forward"] == 4 * 1_176 and flops["pool2", "backward"] == 400
    assert flops["fc2", "forward"] == 1_680 + 10                    # no ReLU after the last layer
    assert flops["loss", "forward + backward"] == 71
    assert flops["optimiser (Adam)", "update"] == pytest.approx(13 * 61_706 / 64)
    # The multiply-adds alone are the step benchmark's count.
    macs = sum(2 * outputs * products for outputs, products, _, _ in layers.WEIGHTED_STAGES.values())
    assert macs == common.forward_flops_per_image()
    parts = [flops[key] for key in flops if key[0] in layers.STAGES + ("loss", "optimiser (Adam)")]
    assert flops["training step", "whole"] == pytest.approx(sum(parts))


def test_roofline_rate_is_flop_times_batch_over_time():
    rows = [{"layer": "conv1", "pass": "forward", "torch": 1e-3, "numba": None}]
    (row,) = layers.roofline_rows(rows, ["torch", "numba"], batch_size=64, peak_flops=100e9)
    assert row["torch"]["gflops"] == pytest.approx(244_608 * 64 / 1e-3 / 1e9)
    assert row["torch"]["share_of_peak"] == pytest.approx(244_608 * 64 / 1e-3 / 100e9)
    assert row["numba"] is None
    assert "| conv1 | forward | 244,608 | 15.7 (15.7%) | fused |" in layers.roofline_markdown([row], ["torch", "numba"], 64, 2)


# ---------------------------------------------------------------- memory


def test_child_peak_rss_sees_the_childs_own_allocation():
    """A child touching 300 MB reports at least that; an empty one far less, although this test
    process (torch, NumPy, Numba loaded) is larger than that: it is not inherited."""
    big = memory.child_peak_rss([sys.executable, "-c", "b = bytearray(300 * 2**20); print('done')"])
    small = memory.child_peak_rss([sys.executable, "-c", "pass"])
    assert big["peak_rss_mib"] >= 300 and big["last_line"] == "done"
    assert small["peak_rss_mib"] < 100
    with pytest.raises(RuntimeError, match="exit 3"):
        memory.child_peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.fixture
def allocating_module(tmp_path, monkeypatch):
    """A module in its own folder: one function allocating a new (1000,) float64 array, one
    writing into a given array."""
    (tmp_path / "alloc_mod.py").write_text(textwrap.dedent("""
        import numpy as np
        def fresh():
            return np.ones(1000)
        def into(out):
            np.multiply(out, 2.0, out=out)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import alloc_mod
    return alloc_mod, str(tmp_path)


def test_step_allocations_names_the_allocating_line(allocating_module):
    module, folder = allocating_module
    kept = []
    found = memory.step_allocations(lambda: kept.append(module.fresh()), package=folder)
    arrays = [entry for entry in found if entry["kind"] == "numpy"]
    assert len(arrays) == 1 and arrays[0]["bytes"] >= 8000 and arrays[0]["line"].endswith("alloc_mod.py:4")
    buffer = np.zeros(1000)
    found = memory.step_allocations(lambda: module.into(buffer), package=folder)
    assert [entry for entry in found if entry["kind"] == "numpy"] == []


def test_step_growth_tells_a_leak_from_a_steady_step(allocating_module):
    module, _ = allocating_module
    kept, buffer = [], np.zeros(1000)
    leak = memory.step_growth(lambda: kept.append(module.fresh()), steps=20)
    steady = memory.step_growth(lambda: module.into(buffer), steps=20)
    assert leak["net_growth_bytes"] >= 20 * 8000 and leak["second_half_growth_bytes"] >= 10 * 8000
    assert leak["peak_within_step_bytes"] >= 8000
    assert steady["net_growth_bytes"] < 8000 and steady["second_half_growth_bytes"] < 8000
    assert steady["peak_within_step_bytes"] < 8000


def test_parity_reuses_a_saved_run_only_while_its_recipe_is_unchanged(tmp_path):
    from benchmarks.parity import is_current_run
    from numpylenet.recipes import make_config

    folder = tmp_path / "speedrun-seed0-numpylenet"
    folder.mkdir()
    config = dataclasses.asdict(make_config("speedrun", seed=0))
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_current_run(folder, "speedrun")              # not finished: no summary.json
    (folder / "summary.json").write_text("{}")
    assert is_current_run(folder, "speedrun")
    assert not is_current_run(folder, "default")
    (folder / "config.json").write_text(json.dumps({**config, "lr": config["lr"] / 4}))  # an older recipe
    assert not is_current_run(folder, "speedrun")


@pytest.mark.parametrize("module, flags, named", [
    ("step", ["--clock-ghz", "-1"], "--clock-ghz"), ("step", ["--clock-ghz", "nan"], "--clock-ghz"),
    ("step", ["--flop-per-cycle", "0"], "--flop-per-cycle"), ("parity", ["--backend", "foo"], "--backend"),
    ("time_to_accuracy", ["--contenders", "torch.compile"], "no contender left"),
    ("step", ["--threads", "two"], "--threads: expected an integer >= 1, got 'two'"),
    ("layers", ["--clock-ghz", "fast"], "--clock-ghz: expected a finite number > 0, got 'fast'"),
    ("layers", ["--clock-ghz", "inf"], "--clock-ghz: must be a finite number > 0, got inf"),
    ("time_to_accuracy", ["--seeds", "-1"], "--seeds: must be an integer >= 0, got -1"),
    ("time_to_accuracy", ["--evaluations", "-2"], "--evaluations: must be an integer >= 1, got -2"),
    ("parity", ["--seeds", "0", "-1"], "--seeds: must be an integer >= 0, got -1"),
])
def test_benchmark_flags_that_cannot_run_are_one_line_errors(tmp_path, module, flags, named):
    """A negative clock would print a negative peak, 0 FLOP/cycle was replaced silently by the detected
    value, a bad backend failed in a child whose error was dropped, and --quick emptied --contenders;
    a word for a number was "invalid _positive_int value"; each error came after the whole usage."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", *flags, "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_quick_changes_defaults_not_the_counts_given(tmp_path):
    """--quick --batch-sizes 3 --repeats 2 timed batch 1 and 32 once: the flags were dropped silently."""
    from benchmarks import step

    result = step.main(["--quick", "--batch-sizes", "3", "5", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)])
    assert result["batch_sizes"] == [3, 5] and result["meta"]["repeats"] == 2
    assert {row["batch_size"] for row in result["rows"]} == {3, 5}


@pytest.mark.parametrize("module", ["step", "time_to_accuracy"])
def test_a_benchmark_refuses_an_output_folder_it_cannot_write_before_it_runs(tmp_path, module):
    """--out naming a file: refused at once, not after minutes of timing (a FileExistsError then)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(blocker)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"--out: cannot write into {blocker}" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and blocker.read_text() == "x"


@pytest.mark.parametrize("form", ["--readme={}", "--readm {}"])
def test_all_hears_a_named_document_in_every_argparse_form(quick_results, tmp_path, form):
    """With --quick only an explicitly named document is rewritten: also as --readme=PATH or abbreviated."""
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    before = readme.read_text()
    subprocess.run([sys.executable, "-m", "benchmarks.all", "--quick", "--no-run", "--out", str(quick_results["out"]),
                    *form.format(readme).split()], cwd=REPO, check=True, capture_output=True)
    assert readme.read_text() != before
