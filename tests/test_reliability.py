"""Issue 15: no run overwrites another, lies about its results, or dies with a traceback.

One test (or group) per finding of the issue, each written to fail on the code before the fix. The
truths are outside the code under test: the bytes a folder held before, what a second independent
run or an evaluation of the same weights reports, a standard JSON parser, the kernel's own file
system errors (a real read-only or full tmpfs when the tests run as root; a test double that makes
the same system calls fail otherwise), real signals sent to real processes.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from cli_runs import (EVALUATE, REPO, TINY, TRAIN, arrays, environment, one_line_error, run_evaluate,
                      run_train, saved, snapshot, strict_json)

from numpylenet.cli import available_cores
from numpylenet.data import write_idx
from numpylenet.loop import NumpyLearner
from numpylenet.recipes import RECIPES
from numpylenet.train import FIGURES, main as train_main


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A finished tiny run of two epochs (asked for 1000 threads); its folder and its stderr."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        assert train_main([*TINY, "--threads", "1000", "--out", str(folder)]) == 0
    return folder, err.getvalue()


class WorseAfterEpochOne(NumpyLearner):
    """The NumPy learner, with every weight scaled up 4x after the first step of epoch 2: a real run
    whose last epoch validates worse than its first, so its best epoch (1) is not its last (2)."""

    def train_step(self, x, y, lr):
        loss = super().train_step(x, y, lr)
        self.taken = getattr(self, "taken", 0) + 1
        if self.taken == 4:
            for param in self.model.parameters():
                param.data *= 4
        return loss


@pytest.fixture(scope="module")
def regressed(tmp_path_factory) -> Path:
    """A finished tiny run whose best epoch is 1 and last epoch 2; its folder."""
    folder = tmp_path_factory.mktemp("regressed") / "run"
    with redirect_stderr(StringIO()), redirect_stdout(StringIO()):
        assert train_main([*TINY, "--out", str(folder)], make_learner=WorseAfterEpochOne) == 0
    assert saved(folder / "last.npz")["best_epoch"] == 1
    return folder


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run that a test may change."""
    return Path(shutil.copytree(finished[0], tmp_path / "copy"))


# ---------------------------------------------------------------------------- 1. data loss on resume

@pytest.mark.parametrize("held", ["a finished run", "only its config.json"])
def test_resume_into_a_folder_holding_another_run_is_refused(capsys, tmp_path, finished, held):
    other = tmp_path / "b"
    if held == "a finished run":
        shutil.copytree(finished[0], other)
    else:
        other.mkdir()
        (other / "config.json").write_text("{}")
    before = snapshot(other)
    code, _, err = run_train(capsys, "--resume", finished[0] / "last.npz", "--epochs", "3", "--out", other)
    assert code == 2 and one_line_error(err) and "already holds a run" in err, err
    assert snapshot(other) == before


def test_a_fresh_run_into_a_folder_with_run_files_is_refused(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    code, _, err = run_train(capsys, *TINY, "--out", tmp_path)
    assert code == 2 and one_line_error(err) and "already holds a run" in err
    assert snapshot(tmp_path) == {"metrics.jsonl": b""}


def test_resuming_best_npz_into_its_own_folder_is_refused(capsys, run_copy):
    before = snapshot(run_copy)
    code, _, err = run_train(capsys, "--resume", run_copy / "best.npz", "--epochs", "3")
    assert code == 2 and one_line_error(err) and "last.npz" in err
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------- 2. two runs, one folder

def test_two_runs_started_together_into_one_folder(tmp_path):
    folder = tmp_path / "run"
    runs = {seed: subprocess.Popen([sys.executable, "-m", "numpylenet.train", *TINY, "--epochs", "1",
                                    "--seed", str(seed), "--out", str(folder)], cwd=REPO,
                                   env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for seed in (1, 2)}
    results = {seed: (*run.communicate(timeout=300), run.returncode) for seed, run in runs.items()}
    assert sorted(code for _, _, code in results.values()) == [0, 2], results
    winner = next(seed for seed, (_, _, code) in results.items() if code == 0)
    loser_err = next(err for _, err, code in results.values() if code == 2)
    assert one_line_error(loser_err) and ("in use by another run" in loser_err
                                         or "already holds a run" in loser_err), loser_err
    # Everything in the folder is the winner's alone.
    assert json.loads((folder / "config.json").read_text())["seed"] == winner
    assert json.loads((folder / "summary.json").read_text())["seed"] == winner
    assert saved(folder / "last.npz", "config")["seed"] == winner
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1


def test_sigterm_stops_like_ctrl_c_and_a_live_run_keeps_its_folder(capsys, tmp_path):
    folder = tmp_path / "live run"   # a space: the "Continue with" hint must quote it
    child = subprocess.Popen([sys.executable, "-m", "numpylenet.train", *TINY, "--epochs", "500",
                              "--backend", "numpy", "--out", str(folder)], cwd=REPO, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "last.npz").exists():   # written just before the first step
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        code, _, err = run_train(capsys, *TINY, "--out", folder)
        assert code == 2 and one_line_error(err) and f"in use by another run (pid {child.pid}" in err, err
        child.send_signal(signal.SIGTERM)
        _, child_err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, child_err
    assert "SIGTERM" in child_err
    hint = shlex.split(child_err.strip().splitlines()[-1])
    assert hint[-2:] == ["--resume", str(folder / "last.npz")]
    stopped = saved(folder / "last.npz")
    assert all(np.isfinite(v).all() for k, v in arrays(folder / "last.npz").items() if k.startswith("model/"))
    assert not list(folder.glob(".*.tmp")) and not (folder / ".run.lock").exists()
    # The hint works as given, and the run continues from where SIGTERM stopped it.
    code, out, _ = run_train(capsys, *hint[3:], "--epochs", stopped["epoch"] + 1)
    assert code == 0 and f"resuming at epoch {stopped['epoch'] + 1}, step {stopped['step'] + 1}" in out


# ---------------------------------------------------------------------------- 3. which weights were tested

def test_the_test_figures_are_the_best_weights_when_the_best_epoch_is_not_the_last(capsys, tmp_path, regressed):
    summary = json.loads((regressed / "summary.json").read_text())
    assert summary["weights_epoch"] == 1 and "best.npz" in summary["weights_used"]
    reports = {}
    for weights in ("best", "last"):
        assert run_evaluate(capsys, regressed / f"{weights}.npz", "--out", tmp_path)[0] == 0
        reports[weights] = json.loads((tmp_path / f"eval-{weights}-mnist-sample.json").read_text())
    assert reports["best"]["test_loss"] != reports["last"]["test_loss"]      # the two do differ
    assert (summary["test_loss"], summary["test_accuracy"]) == (reports["best"]["test_loss"],
                                                                reports["best"]["test_accuracy"])


def test_resume_without_best_npz_reports_the_last_weights(capsys, tmp_path, regressed):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(regressed / "last.npz", folder / "last.npz")
    code, out, _ = run_train(capsys, "--resume", folder / "last.npz")
    assert code == 0 and "already finished" in out and "resuming at epoch" not in out
    assert "lowest validation loss" not in out and "the last weights, after epoch 2" in out, out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best_epoch"] is None and summary["weights_epoch"] == 2
    assert summary["best_valid_loss"] is None          # no best epoch is claimed, nor its loss
    # The accuracy reported is that of the last weights, as evaluate measures them.
    assert run_evaluate(capsys, folder / "last.npz", "--out", tmp_path / "eval")[0] == 0
    report = json.loads((tmp_path / "eval" / "eval-last-mnist-sample.json").read_text())
    assert report["test_accuracy"] == summary["test_accuracy"]


def test_two_runs_best_npz_evaluated_into_one_folder_keep_both_reports(capsys, tmp_path, finished, regressed,
                                                                          monkeypatch):
    """Both checkpoints are named best.npz: the second report goes beside the first (-2), each
    naming its checkpoint and giving its own figures, and evaluating one of them again, spelled as
    another path, replaces its own report instead of adding a third."""
    out = tmp_path / "eval"
    alone = {}
    for run in (finished[0], regressed):          # each alone, into its own folder, as a truth
        assert run_evaluate(capsys, run / "best.npz", "--out", tmp_path / run.parent.name)[0] == 0
        alone[run] = json.loads((tmp_path / run.parent.name / "eval-best-mnist-sample.json").read_text())
    assert alone[finished[0]]["test_loss"] != alone[regressed]["test_loss"]      # the two do differ
    for run in (finished[0], regressed):
        assert run_evaluate(capsys, run / "best.npz", "--out", out)[0] == 0
    first, second = (json.loads((out / f"{stem}.json").read_text())
                     for stem in ("eval-best-mnist-sample", "eval-best-mnist-sample-2"))
    assert (first["checkpoint"], second["checkpoint"]) == (str(finished[0] / "best.npz"), str(regressed / "best.npz"))
    assert first == alone[finished[0]] and second == alone[regressed]
    assert first["trained"] == {"epoch": saved(finished[0] / "best.npz")["epoch"], "step": 0}
    assert (out / "eval-best-mnist-sample-2-confusion_matrix.png").exists()
    monkeypatch.chdir(regressed)
    code, out_text, _ = run_evaluate(capsys, "best.npz", "--out", out)
    assert code == 0 and str(out / "eval-best-mnist-sample-2.json") in out_text
    assert sorted(path.name for path in out.glob("*.json")) == ["eval-best-mnist-sample-2.json",
                                                                "eval-best-mnist-sample.json"]


def test_best_npz_of_another_run_is_not_claimed(capsys, tmp_path, finished, regressed):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(regressed / "last.npz", folder / "last.npz")
    shutil.copy(finished[0] / "best.npz", folder / "best.npz")   # epoch 2 of another run
    code, out, err = run_train(capsys, "--resume", folder / "last.npz", "--epochs", "3")
    assert code == 0 and "does not hold the best weights of this run" in err
    # The earlier epochs' best cannot be shown, so the best is chosen among epoch 3 on: epoch 3.
    assert "the weights of epoch 3 (lowest validation loss of epochs 3-3" in out, out
    assert saved(folder / "best.npz")["epoch"] == 3 and saved(folder / "last.npz")["best_epoch"] == 3


def test_a_finished_run_with_another_run_s_best_npz_claims_no_best(capsys, tmp_path, finished, regressed):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(regressed / "last.npz", folder / "last.npz")
    shutil.copy(finished[0] / "best.npz", folder / "best.npz")
    code, out, err = run_train(capsys, "--resume", folder / "last.npz")      # tested again, as it is
    assert code == 0 and "does not hold the best weights of this run" in err
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["best_epoch"], summary["best_valid_loss"], summary["weights_epoch"]) == (None, None, 2)


# ---------------------------------------------------------------------------- 4. non-finite validation or weights

class PoisonAfter(NumpyLearner):
    """The NumPy learner, whose weights turn NaN right after its ``at``-th step (that step's loss,
    computed before the update, is finite); optionally with a real signal at the same step."""

    at, signum = 0, None

    def train_step(self, x, y, lr):
        loss = super().train_step(x, y, lr)
        self.taken = getattr(self, "taken", 0) + 1
        if self.taken == self.at:
            for param in self.model.parameters():
                param.data[...] = np.nan
            if self.signum:
                os.kill(os.getpid(), self.signum)
        return loss


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("signum", [None, signal.SIGINT], ids=["validation", "ctrl-c"])
def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(capsys, tmp_path, signum):
    # TINY's epoch 2 is steps 4-6: poisoned at its last step, NaN shows first in validation; at its
    # first step with Ctrl-C, in the weights about to be saved.
    poisoned = type("Poisoned", (PoisonAfter,), {"at": 4 if signum else 6, "signum": signum})
    code, _, err = run_train(capsys, *TINY, "--out", tmp_path, make_learner=poisoned)
    assert code == 1 and "last good checkpoint" in err and "(after epoch 1)" in err, err
    kept = arrays(tmp_path / "last.npz")
    assert all(np.isfinite(value).all() for name, value in kept.items() if name.startswith("model/"))
    assert (saved(tmp_path / "last.npz")["epoch"], saved(tmp_path / "last.npz")["step"]) == (1, 0)


# ---------------------------------------------------------------------------- 5, 8. schedules over few steps

class RecordRates(NumpyLearner):
    def train_step(self, x, y, lr):
        type(self).rates.append(lr)
        return super().train_step(x, y, lr)


def test_a_run_of_one_step_trains_at_the_peak_and_says_it_is_too_short(capsys, tmp_path):
    recorder = type("Recorder", (RecordRates,), {"rates": []})
    code, _, err = run_train(capsys, "--dataset", "mnist-sample", "--limit-train", "64", "--valid-size",
                             "0.01", "--batch-size", "1000000000", "--epochs", "1", "--out", tmp_path,
                             make_learner=recorder)
    assert code == 0 and recorder.rates == [RECIPES["default"]["lr"]]   # the peak, not peak / 25e4
    assert "WARNING" in err and "single step" in err and "one-cycle" in err


def test_each_epoch_records_the_learning_rate_of_its_last_step(capsys, tmp_path):
    recorder = type("Recorder", (RecordRates,), {"rates": []})
    assert run_train(capsys, *TINY, "--out", tmp_path, make_learner=recorder)[0] == 0
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = len(recorder.rates) // len(history)
    assert steps > 1 and len(set(recorder.rates)) == len(recorder.rates)     # a rate that moves every step
    assert [record["lr_end"] for record in history] == [recorder.rates[steps - 1], recorder.rates[-1]]


def test_a_run_of_four_steps_finishes(capsys, tmp_path):
    # 4 steps: torch's OneCycleLR divides 0 by 0 here (the issue's --batch-size 5400 --epochs 4).
    recorder = type("Recorder", (RecordRates,), {"rates": []})
    code, _, _ = run_train(capsys, "--dataset", "mnist-sample", "--limit-train", "64", "--valid-size",
                           "0.01", "--batch-size", "64", "--epochs", "4", "--out", tmp_path,
                           make_learner=recorder)
    assert code == 0 and len(recorder.rates) == 4 and recorder.rates[0] == RECIPES["default"]["lr"]
    assert all(a > b for a, b in zip(recorder.rates, recorder.rates[1:]))


# ---------------------------------------------------------------------------- 6. resume keeps the data order

@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "16"], "--batch-size 16"), (["--valid-size", "0.02"], "--valid-size 0.02"),
    (["--seed", "5"], "--seed 5"), (["--no-augment"], "--no-augment"),
    (["--limit-train", "32"], "--limit-train 32"), (["--dataset", "mnist"], "--dataset mnist"),
    (["--optimizer", "adam"], "--optimizer adam"), (["--pool", "max"], "--pool max"),
])
def test_resume_refuses_settings_that_change_the_run(capsys, run_copy, flags, named):
    before = snapshot(run_copy)
    code, _, err = run_train(capsys, "--resume", run_copy / "last.npz", "--epochs", "3", *flags)
    assert code == 2 and one_line_error(err) and named in err and "--epochs" in err, err
    assert snapshot(run_copy) == before


def test_resume_may_change_the_epochs_and_the_learning_rate(capsys, run_copy):
    code, out, _ = run_train(capsys, "--resume", run_copy / "last.npz", "--epochs", "3", "--lr", "1e-3",
                             "--dataset", "mnist-sample")
    assert code == 0 and "epoch 3/3" in out
    assert saved(run_copy / "last.npz", "config")["lr"] == 1e-3


def test_a_finished_run_refuses_what_would_rewrite_its_description(capsys, run_copy):
    """Resuming a finished run of 2 epochs tests it again. --epochs 1 (below what it trained) and
    a new --lr (which would train nothing) are refused: config.json would describe no training
    that happened. Nothing in the folder changes."""
    before = snapshot(run_copy)
    for flags, named in ((["--epochs", "1"], "--epochs must be at least 2"), (["--lr", "0.5"], "--lr 0.5")):
        code, _, err = run_train(capsys, "--resume", run_copy / "last.npz", *flags)
        assert code == 2 and one_line_error(err) and named in err, err
        assert snapshot(run_copy) == before
    code, out, _ = run_train(capsys, "--resume", run_copy / "last.npz", "--epochs", "2")
    assert code == 0 and "already finished its 2 of 2 epochs" in out


def test_a_run_that_fell_back_to_the_sample_resumes_on_it_once_mnist_appears(capsys, tmp_path):
    """--dataset auto without MNIST trains on mnist-sample; MNIST then appears in the data folder
    (tiny stand-in files): the resumed run continues on mnist-sample, still flagged as a fallback,
    as with --dataset mnist-sample given (the data set it trained on)."""
    data_dir, folder = tmp_path / "data", tmp_path / "run"
    tiny = [flag for flag in TINY if flag not in ("--dataset", "mnist-sample")]
    code, _, _ = run_train(capsys, *tiny, "--epochs", "1", "--dataset", "auto", "--data-dir", data_dir,
                           "--no-download", "--out", folder)
    first = json.loads((folder / "config.json").read_text())["resolved"]
    assert code == 0 and first["dataset"] == "mnist-sample" and first["dataset_fallback"]
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("t10k", 50)):
        (data_dir / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        write_idx(data_dir / "MNIST" / "raw" / f"{split}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(data_dir / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte.gz",
                  rng.integers(0, 10, count, dtype=np.uint8))
    for epochs, extra in ((2, []), (3, ["--dataset", "mnist-sample"])):
        code, out, err = run_train(capsys, "--resume", folder / "last.npz", "--epochs", epochs, *extra)
        assert code == 0 and f"resuming at epoch {epochs}" in out, err
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["dataset"] == "mnist-sample" and summary["dataset_fallback"], summary
        resolved = json.loads((folder / "config.json").read_text())["resolved"]
        assert {key: resolved[key] for key in ("dataset", "train_images", "valid_images", "test_images")} == \
            {key: first[key] for key in ("dataset", "train_images", "valid_images", "test_images")}


# ---------------------------------------------------------------------------- 9. empty splits

def mnist_folder(root: Path, train_count: int, test_count: int) -> Path:
    """A data root whose MNIST/raw holds that many (blank) training and test images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", train_count), ("t10k", test_count)):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((count, 28, 28), np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10)
    return root


@pytest.mark.parametrize("case", ["--valid-size 0.0001", "one training image", "empty test set"])
def test_an_empty_split_is_a_one_line_error(capsys, tmp_path, case):
    if case.startswith("--"):
        flags = ["--dataset", "mnist-sample", "--valid-size", "0.0001"]
    else:
        root = mnist_folder(tmp_path / "data", *((1, 10) if case == "one training image" else (20, 0)))
        flags = ["--dataset", "mnist", "--data-dir", root, "--no-download"]
    code, out, err = run_train(capsys, *flags, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 2 and one_line_error(err) and out == "", err
    assert ("test set" if case == "empty test set" else "valid_size") in err
    assert not (tmp_path / "run").exists()


def test_evaluate_on_an_empty_test_set_is_a_one_line_error(capsys, tmp_path, finished):
    root = mnist_folder(tmp_path / "data", 20, 0)
    code, _, err = run_evaluate(capsys, finished[0] / "best.npz", "--dataset", "mnist", "--data-dir", root,
                                "--out", tmp_path / "eval")
    assert code == 2 and one_line_error(err, EVALUATE) and "no image" in err


# ---------------------------------------------------------------------------- 10, 11. storage that refuses

@contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``path`` (root only; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@contextmanager
def refusing(monkeypatch, root: Path, code: int):
    """A test double of a file system at ``root`` that refuses every change with ``OSError(code)``:
    the system calls that create, write, rename or remove files there fail as the kernel's would."""
    root = root.resolve()

    def inside(path) -> bool:
        try:
            return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(root)
        except TypeError:   # a file descriptor
            return False

    def refuse(function, writes=lambda *args, **kwargs: True):
        def wrapper(path, *args, **kwargs):
            if inside(path) and writes(*args, **kwargs):
                raise OSError(code, os.strerror(code), str(path))
            return function(path, *args, **kwargs)
        return wrapper

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    monkeypatch.setattr(os, "open", refuse(os.open, lambda flags, *a, **k: flags & writing))
    for name in ("mkdir", "rmdir", "unlink", "remove", "replace", "rename"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    import builtins
    import io
    opener = refuse(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    yield


@pytest.fixture(params=["tmpfs", "test double"])
def read_only(request, monkeypatch, tmp_path):
    """A factory: ``read_only(fill)`` returns a read-only folder holding what ``fill(folder)`` put there."""
    folder = tmp_path / "ro"

    @contextmanager
    def make(fill=lambda folder: None):
        if request.param == "tmpfs":
            with tmpfs(folder, "4m"):
                fill(folder)
                remount_read_only(folder)
                yield folder
        else:
            folder.mkdir()
            fill(folder)
            with refusing(monkeypatch, folder, errno.EROFS):
                yield folder
    return make


def test_train_into_a_read_only_folder(capsys, read_only):
    with read_only() as folder:
        code, out, err = run_train(capsys, *TINY, "--out", folder / "run")
        assert code == 2 and one_line_error(err) and "Read-only file system" in err and out == "", err
        code, out, err = run_train(capsys, *TINY, "--out", folder)   # the existing folder itself
        assert code == 2 and one_line_error(err) and "Read-only file system" in err and out == "", err
        assert list(folder.iterdir()) == []


def test_evaluate_a_checkpoint_in_a_read_only_folder(capsys, read_only, finished):
    with read_only(lambda folder: shutil.copy(finished[0] / "best.npz", folder)) as folder:
        code, out, err = run_evaluate(capsys, folder / "best.npz")
        assert code == 2 and one_line_error(err, EVALUATE) and "Read-only file system" in err, err
        assert "accuracy" not in out   # refused before computing, not after printing
        assert sorted(path.name for path in folder.iterdir()) == ["best.npz"]


def test_data_dir_on_a_read_only_file_system(capsys, read_only, tmp_path):
    with read_only() as folder:
        code, _, err = run_train(capsys, "--dataset", "mnist", "--data-dir", folder, "--out", tmp_path / "run")
        assert code == 2 and one_line_error(err) and "Read-only file system" in err, err
        from numpylenet.pipeline import load_dataset
        *_, dataset, reason = load_dataset("auto", str(folder), True, train=False)
        assert dataset == "mnist-sample" and "Read-only file system" in reason
        assert list(folder.iterdir()) == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_data_dir_that_is_a_file(capsys, tmp_path, finished, tool):
    (tmp_path / "data").write_text("not a folder")
    flags = ["--dataset", "mnist", "--data-dir", tmp_path / "data", "--out", tmp_path / "out"]
    code, _, err = (run_train(capsys, *flags) if tool == "train"
                    else run_evaluate(capsys, finished[0] / "best.npz", *flags))
    assert code == 2 and one_line_error(err, TRAIN if tool == "train" else EVALUATE), err
    assert f"{tmp_path / 'data'} is a file, not a folder" in err


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_out_that_is_a_file(capsys, tmp_path, finished, tool):
    (tmp_path / "out").write_text("a file")
    code, _, err = (run_train(capsys, *TINY, "--out", tmp_path / "out") if tool == "train"
                    else run_evaluate(capsys, finished[0] / "best.npz", "--out", tmp_path / "out"))
    assert code == 2 and one_line_error(err, TRAIN if tool == "train" else EVALUATE), err
    assert "not a folder" in err and (tmp_path / "out").read_text() == "a file"


@contextmanager
def full_disk_at(monkeypatch, name: str, after: int):
    """A test double of a disk that fills up: fsync of a temporary of ``name`` fails with ENOSPC from
    its ``after``-th call on (fsync is where a full disk shows for data already "written")."""
    calls = {"count": 0}
    fsync = os.fsync

    def failing(fd):
        if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            calls["count"] += 1
            if calls["count"] >= after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    yield


@pytest.mark.parametrize("disk", ["tmpfs", "test double"])
def test_disk_full_while_saving_a_checkpoint(capsys, monkeypatch, tmp_path, disk):
    folder = tmp_path / "disk"
    if disk == "tmpfs":   # room for two checkpoints, not for the third while the second is there
        context = tmpfs(folder, "1200k")
    else:
        folder.mkdir()
        context = full_disk_at(monkeypatch, "last.npz", after=2)
    with context:
        code, _, err = run_train(capsys, *TINY, "--out", folder / "run")
        assert code == 2 and one_line_error(err) and "No space left on device" in err, err
        kept = saved(folder / "run" / "last.npz")   # the previous one survives, whole
        state = f"after epoch {kept['epoch']}" if kept["epoch"] else "before the first step"
        assert kept["step"] == 0 and f"last.npz holds the last saved state ({state})" in err, err
        assert not list((folder / "run").glob(".*.tmp"))


# ---------------------------------------------------------------------------- 12. checkpoints of the wrong types

WRONG_TYPES = [("config", "epochs", "3"), ("config", "epochs", None), ("config", "lr", "abc"),
               ("config", "seed", 1.5), ("config", "batch_size", 2.5), ("progress", "epoch", "x"),
               ("progress", "epoch", -3), ("progress", "step", 10**9), ("progress", "dataset", "foo"),
               ("progress", "dataset", "auto"), ("history", None, [1, 2, 3]),
               ("optimizer/step", None, np.zeros(2, np.int64)), ("model/fc2.bias", None, np.zeros(10)),
               ("optimizer/momentum_buffer.9", None, np.zeros(10))]


@pytest.mark.parametrize("part, field, value", WRONG_TYPES,
                         ids=[f"{part}-{field}-{value!r}"[:40] for part, field, value in WRONG_TYPES])
def test_checkpoint_with_wrong_types_is_corrupt(capsys, tmp_path, finished, part, field, value):
    entries = arrays(finished[0] / "last.npz")
    if part.startswith(("optimizer/", "model/")):
        entries[part] = value
    elif field is None:
        entries[part] = np.array(json.dumps(value))
    else:
        content = json.loads(str(entries[part]))
        content[field] = value
        entries[part] = np.array(json.dumps(content))
    np.savez(tmp_path / "doctored.npz", **entries)
    code, _, err = run_train(capsys, "--resume", tmp_path / "doctored.npz", "--out", tmp_path / "run")
    assert code == 2 and one_line_error(err) and "corrupt" in err, err
    if part in ("config", "progress") or part.startswith("model/"):
        code, _, err = run_evaluate(capsys, tmp_path / "doctored.npz", "--out", tmp_path / "eval")
        assert code == 2 and one_line_error(err, EVALUATE) and "corrupt" in err, err


# ---------------------------------------------------------------------------- 13. a damaged Numba cache

def test_truncated_numba_cache_files_are_discarded_and_recompiled(tmp_path):
    """Two entries of a copy of the package's Numba cache are cut short - one's index, the other's
    data - and a training run in that copy must recover from both, saying so."""
    pytest.importorskip("numba")
    from numpylenet.recipes import make_config
    NumpyLearner(make_config("default", backend="numba"))   # the repository's cache is complete
    package = shutil.copytree(REPO / "numpylenet", tmp_path / "numpylenet")   # mtimes kept: still valid
    loads = subprocess.run(
        [sys.executable, "-c", "from numpylenet.loop import NumpyLearner\n"
                               "from numpylenet.recipes import make_config\n"
                               "NumpyLearner(make_config('default', backend='numba'))"],
        cwd=tmp_path, env=environment(NUMBA_DEBUG_CACHE="1", PYTHONPATH=str(tmp_path)),
        capture_output=True, text=True, timeout=600)
    assert loads.returncode == 0, loads.stderr
    indexes = {Path(line.split("index loaded from ")[1].strip("'")) for line in loads.stdout.splitlines()
               if "index loaded from" in line}
    assert len(indexes) >= 2 and all(path.is_relative_to(package) for path in indexes), loads.stdout[-2000:]

    def entry(index: Path) -> list[Path]:
        return sorted(index.parent.glob(index.name[:-len(".nbi")] + ".*"))

    # The two quickest kernels to compile again: the first loses its index, the second its data.
    first, second = sorted(indexes, key=lambda index: sum(path.stat().st_size for path in entry(index)))[:2]
    for victim in [first, *(path for path in entry(second) if path.suffix == ".nbc")]:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    run = subprocess.run([sys.executable, "-m", "numpylenet.train", *TINY, "--epochs", "1",
                          "--backend", "numba", "--out", str(tmp_path / "run")],
                         cwd=tmp_path, env=environment(PYTHONPATH=str(tmp_path)), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for index in (first, second):
        assert f"Numba's disk cache entry {index} could not be read" in run.stderr, run.stderr[-3000:]
    assert run.stderr.count("compiled anew") == 2 and "Traceback" not in run.stderr


# ---------------------------------------------------------------------------- smaller findings

def test_stale_temporaries_are_removed_at_resume(capsys, run_copy):
    for name in (".last.npz.0a1b2c3d.tmp", ".best.npz.deadbeef.tmp", ".summary.json.12345678.tmp"):
        (run_copy / name).write_bytes(b"\0" * 1000)
    (run_copy / ".notes.tmp").write_text("the user's own file")
    code, _, err = run_train(capsys, "--resume", run_copy / "last.npz")
    assert code == 0 and "removed 3 temporary files" in err
    assert sorted(path.name for path in run_copy.glob(".*")) == [".notes.tmp"]


def test_best_and_last_stay_consistent_when_killed_between_them(capsys, monkeypatch, tmp_path):
    """A kill after any one of an epoch's two checkpoint writes leaves a pair the resumed run can
    trust: best.npz is the best epoch last.npz names, or last.npz is itself that best."""
    replace = os.replace
    replaced = []

    def killed_after_fourth(source, target):
        replace(source, target)
        if str(target).endswith(".npz"):
            replaced.append(Path(target).name)
            if len(replaced) == 4:   # the initial last.npz, two of epoch 1, the first of epoch 2
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed_after_fourth)
    flags = ["--dataset", "mnist-sample", "--limit-train", "64", "--batch-size", "32", "--epochs", "2",
             "--valid-size", "0.01", "--recipe", "seed", "--backend", "numpy", "--out", tmp_path]
    code, _, _ = run_train(capsys, *flags)
    monkeypatch.setattr(os, "replace", replace)
    assert code == 130
    last, best = saved(tmp_path / "last.npz"), saved(tmp_path / "best.npz")
    assert best["epoch"] <= last["epoch"], "best.npz is ahead of last.npz"
    assert best["epoch"] == last["best_epoch"] or (last["best_epoch"] == last["epoch"] and last["step"] == 0)
    code, out, _ = run_train(capsys, "--resume", tmp_path / "last.npz")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0 and summary["best_epoch"] == saved(tmp_path / "best.npz")["epoch"], out
    assert saved(tmp_path / "best.npz")["epoch"] == saved(tmp_path / "last.npz")["best_epoch"]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_json_outputs_write_null_for_non_finite_numbers(capsys, tmp_path, finished):
    entries = arrays(finished[0] / "best.npz")
    entries["model/fc2.weight"] = np.full_like(entries["model/fc2.weight"], 3e38)   # finite, overflows
    np.savez(tmp_path / "huge.npz", **entries)
    code, out, _ = run_evaluate(capsys, tmp_path / "huge.npz", "--out", tmp_path)
    assert code == 0 and "test loss nan" in out
    assert strict_json(tmp_path / "eval-huge-mnist-sample.json")["test_loss"] is None
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        strict_json(finished[0] / name)


@pytest.mark.parametrize("weights", ["nan", "inf", "float16", "uint64"])
def test_non_finite_or_non_float_weights_are_refused(capsys, tmp_path, finished, weights):
    entries = arrays(finished[0] / "best.npz")
    conv1 = entries["model/conv1.weight"]
    entries["model/conv1.weight"] = (np.full_like(conv1, float(weights)) if weights in ("nan", "inf")
                                     else conv1.astype(weights))
    np.savez(tmp_path / "bad.npz", **entries)
    code, out, err = run_evaluate(capsys, tmp_path / "bad.npz", "--out", tmp_path)
    assert code == 2 and one_line_error(err, EVALUATE) and "conv1.weight" in err and "accuracy" not in out
    code, _, err = run_train(capsys, "--resume", tmp_path / "bad.npz", "--out", tmp_path / "run")
    assert code == 2 and one_line_error(err) and "conv1.weight" in err


def test_a_crafted_checkpoint_cannot_make_evaluate_allocate_much(capsys, tmp_path, finished):
    """A member of 200 MB of zeros compresses to 0.2 MB; its declared size gives it away."""
    import tracemalloc
    import zipfile

    crafted = tmp_path / "crafted.npz"
    shutil.copy(finished[0] / "best.npz", crafted)
    header = b"\x93NUMPY\x01\x00" + b"{'descr': '<f8', 'fortran_order': False, 'shape': (25000000,), }"
    header = header.ljust(127) + b"\n"
    with zipfile.ZipFile(crafted, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("optimizer/exp_avg.99.npy", "w", force_zip64=True) as member:
            member.write(header)
            for _ in range(200):
                member.write(bytes(1_000_000))
    tracemalloc.start()
    try:
        code, _, err = run_evaluate(capsys, crafted, "--out", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and one_line_error(err, EVALUATE) and "declares" in err, err
    assert peak < 50e6, f"evaluate allocated {peak / 1e6:.0f} MB"


needs_torch = pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None,
                                 reason="torch is not installed")


@needs_torch
@pytest.mark.parametrize("content", ["pickled code", "garbage", "empty", "complex", "float16", "legacy format"])
def test_torch_file_errors_are_one_line(capsys, tmp_path, finished, content):
    import torch

    weights = {name: torch.from_numpy(value) for name, value in arrays(finished[0] / "best.npz").items()
               if name.startswith("model/")}
    weights = {name[len("model/"):]: value for name, value in weights.items()}
    path = tmp_path / "weights.pt"
    if content == "pickled code":
        torch.save({"conv1.weight": Exploit(tmp_path / "exploited")}, path)
    elif content == "legacy format":     # torch warned of its pickle protocol on stderr, then failed
        torch.save(weights, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    elif content in ("complex", "float16"):
        weights["conv1.weight"] = weights["conv1.weight"].to(torch.complex64 if content == "complex"
                                                              else torch.float16)
        torch.save(weights, path)
    else:
        path.write_bytes(os.urandom(300) if content == "garbage" else b"")
    code, out, err = run_evaluate(capsys, path, "--dataset", "mnist-sample", "--out", tmp_path)
    assert code == 2 and one_line_error(err, EVALUATE) and str(path) in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "weights_only" not in err and "safe_globals" not in err and "accuracy" not in out
    assert not (tmp_path / "exploited").exists()


class Exploit:
    """Unpickled, it would create a file: code run by merely loading weights."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@needs_torch
def test_an_upper_case_pt_suffix_is_a_torch_file(capsys, tmp_path, finished):
    import torch

    weights = {name[len("model/"):]: torch.from_numpy(value)
               for name, value in arrays(finished[0] / "best.npz").items() if name.startswith("model/")}
    torch.save(weights, tmp_path / "WEIGHTS.PT")
    code, out, err = run_evaluate(capsys, tmp_path / "WEIGHTS.PT", "--dataset", "mnist-sample",
                                  "--out", tmp_path)
    assert code == 0 and "accuracy" in out, err


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_an_empty_out_is_refused(capsys, monkeypatch, tmp_path, finished, tool):
    monkeypatch.chdir(tmp_path)
    code, _, err = (run_train(capsys, *TINY, "--out", "") if tool == "train"
                    else run_evaluate(capsys, finished[0] / "best.npz", "--out", ""))
    assert code == 2 and "--out" in err and "empty" in err
    assert list(tmp_path.iterdir()) == []


def test_continue_hint_quotes_paths(capsys, tmp_path):
    class Interrupting(NumpyLearner):
        def train_step(self, x, y, lr):
            os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(x, y, lr)

    folder = tmp_path / "a run; with spaces"
    code, _, err = run_train(capsys, *TINY, "--out", folder, make_learner=Interrupting)
    assert code == 130
    assert shlex.split(err.strip().splitlines()[-1])[-2:] == ["--resume", str(folder / "last.npz")]


def test_checkpoints_have_the_file_mode_of_the_other_outputs(finished):
    modes = {path.name: path.stat().st_mode & 0o777 for path in finished[0].iterdir()}
    assert len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert modes["last.npz"] == 0o666 & ~umask


def test_threads_are_capped_at_the_cores_available(finished):
    """(Or below them, at NUMBA_NUM_THREADS, for the numba backend run with it set lower.)"""
    from numpylenet.backend import resolve_backend

    folder, err = finished
    limit = available_cores()
    if resolve_backend(None) == "numba":
        import numba

        limit = min(limit, numba.config.NUMBA_NUM_THREADS)
    if limit == available_cores():
        cores = available_cores()
        assert f"--threads 1000 capped at the {cores} core{'s' if cores > 1 else ''} available" in err
    assert "--threads 1000 capped at" in err
    assert json.loads((folder / "config.json").read_text())["threads"] == limit


@pytest.mark.skipif(available_cores() < 2, reason="needs 2 cores to ask for more threads than Numba runs")
def test_threads_are_capped_at_the_threads_numba_launched_with(tmp_path):
    """NUMBA_NUM_THREADS=1 caps the numba backend at one thread whatever --threads says: config.json
    says 1, and a note says why, instead of recording the 2 asked for."""
    from numpylenet.backend import numba_unavailable_reason

    if numba_unavailable_reason() is not None:
        pytest.skip(numba_unavailable_reason())
    folder = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "numpylenet.train", *TINY, "--epochs", "1", "--backend", "numba",
                          "--threads", "2", "--out", str(folder)], cwd=REPO, env=environment(NUMBA_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--threads 2 capped at NUMBA_NUM_THREADS=1" in run.stderr
    assert json.loads((folder / "config.json").read_text())["threads"] == 1


def test_ctrl_c_during_the_test_leaves_a_run_that_resume_tests_again(capsys, monkeypatch, tmp_path):
    """Ctrl-C while the trained run is tested and drawn: exit 130 with the command that tests it
    again, no summary.json (it is written last, so a folder holding one holds every output), and
    that command then writes every output."""
    from numpylenet import plots

    draw = plots.plot_learning_curves

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return draw(*args, **kwargs)

    folder = tmp_path / "run"
    monkeypatch.setattr(plots, "plot_learning_curves", interrupted)
    code, _, err = run_train(capsys, *TINY, "--out", folder)
    assert code == 130 and "stopped before the test was done" in err, err
    hint = shlex.split(err.strip().splitlines()[-1])
    assert hint[-2:] == ["--resume", str(folder / "last.npz")]
    assert not (folder / "summary.json").exists() and saved(folder / "last.npz")["epoch"] == 2
    monkeypatch.setattr(plots, "plot_learning_curves", draw)
    code, out, _ = run_train(capsys, *hint[3:])
    assert code == 0 and "already finished" in out
    assert all((folder / name).exists() for name in ("summary.json", *FIGURES))


def test_a_second_ctrl_c_stops_at_once_and_names_the_state_to_resume_from(capsys, tmp_path):
    """The first Ctrl-C asks to stop after the step; a second one, inside that step, stops at once
    (nothing saved): the message names what last.npz holds (the end of epoch 1: step 4 is epoch
    2's first) and the command that continues, which then works."""
    class CtrlCTwiceAtStepFour(NumpyLearner):
        def train_step(self, x, y, lr):
            self.taken = getattr(self, "taken", 0) + 1
            if self.taken == 4:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(x, y, lr)

    folder = tmp_path / "run"
    code, _, err = run_train(capsys, *TINY, "--out", folder, make_learner=CtrlCTwiceAtStepFour)
    assert code == 130 and "Ctrl-C again: stopped at once" in err and "(after epoch 1)" in err, err
    assert (saved(folder / "last.npz")["epoch"], saved(folder / "last.npz")["step"]) == (1, 0)
    hint = shlex.split(err.strip().splitlines()[-1])
    assert hint[-2:] == ["--resume", str(folder / "last.npz")]
    code, out, _ = run_train(capsys, *hint[3:])
    assert code == 0 and "resuming at epoch 2, step 1" in out, out


def test_a_finished_run_resumed_to_train_further_drops_its_old_test_results(capsys, tmp_path, finished):
    """Extending a finished run: its summary.json and figures are of weights the extension
    replaces, so they are gone from its first step on (a Ctrl-C there must not leave a summary of
    epoch 2 beside a last.npz of epoch 3), and the finished extension writes them anew."""
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder)
    assert all((folder / name).exists() for name in ("summary.json", *FIGURES))

    class InterruptedAtOnce(NumpyLearner):
        def train_step(self, x, y, lr):
            os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(x, y, lr)

    code, _, err = run_train(capsys, "--resume", folder / "last.npz", "--epochs", "3",
                             make_learner=InterruptedAtOnce)
    assert code == 130 and saved(folder / "last.npz")["epoch"] == 2 and saved(folder / "last.npz")["step"] == 1, err
    assert not any((folder / name).exists() for name in ("summary.json", *FIGURES))
    # evaluate names the point of the run its weights are from: this last.npz is one step into epoch 3
    code, out, _ = run_evaluate(capsys, folder / "last.npz", "--out", tmp_path / "eval")
    assert code == 0 and f"{folder / 'last.npz'} (epoch 3, after step 1) on the" in out, out
    report = json.loads((tmp_path / "eval" / "eval-last-mnist-sample.json").read_text())
    assert report["trained"] == {"epoch": 2, "step": 1}
    assert run_train(capsys, "--resume", folder / "last.npz")[0] == 0
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 3
    assert all((folder / name).exists() for name in FIGURES)


def test_output_piped_into_head_ends_without_a_traceback(tmp_path, finished):
    """``evaluate ... | head -1``: the reader goes after one line; the tool stops quietly (141, as
    a writer killed by SIGPIPE) instead of printing a BrokenPipeError traceback."""
    command = (f"{shlex.quote(sys.executable)} -m numpylenet.evaluate {shlex.quote(str(finished[0] / 'best.npz'))} "
               f"--out {shlex.quote(str(tmp_path))} | head -1")
    result = subprocess.run(["bash", "-c", f"{command}; echo \"status ${{PIPESTATUS[0]}}\""], cwd=REPO,
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert len(result.stdout.splitlines()) == 2 and result.stdout.splitlines()[-1] in ("status 141", "status 0")


def test_resume_after_an_epoch_s_last_step_says_it_resumes_at_its_end(capsys, tmp_path):
    """Stopped after step 3 of an epoch of 3 steps: there is no step 4 to resume at."""
    class InterruptedOnStepThree(NumpyLearner):
        def train_step(self, x, y, lr):
            self.taken = getattr(self, "taken", 0) + 1
            if self.taken == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_step(x, y, lr)

    folder = tmp_path / "run"
    code, _, err = run_train(capsys, *TINY, "--out", folder, make_learner=InterruptedOnStepThree)
    assert code == 130 and "epoch 1, step 3" in err, err
    code, out, _ = run_train(capsys, "--resume", folder / "last.npz")
    assert code == 0 and "resuming at epoch 1, its end" in out and "step 4" not in out, out
