"""End-to-end tests of ``numpylenet.train`` / ``numpylenet.evaluate`` on the bundled mnist-sample.

Runs are tiny (``--limit-train``, two epochs) and call ``main`` in-process; Ctrl-C is a real SIGINT
sent to this process at a chosen step. The truths checked against are independent of the code
under test: torch (its OneCycleLR, its LeNet, torchvision's transforms), an uninterrupted run for
resume, and the files' own contents (PNG signatures, JSON that parses, npz readable without pickle).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import arrays, run_evaluate, saved
from cli_runs import run_train as train

from numpylenet.checkpoint import load_checkpoint
from numpylenet.cli import confusion_matrix, per_class_accuracy
from numpylenet.evaluate import main as evaluate_main
from numpylenet.loop import NumpyLearner, Terminated
from numpylenet.data import load_mnist, write_idx
from numpylenet.names import BACKEND_NAMES, OPTIMIZER_NAMES
from numpylenet.recipes import RECIPES, TrainConfig, make_config
from numpylenet.train import FIGURES, main as train_main

REPO = Path(__file__).resolve().parent.parent
PROG = "python -m numpylenet.train"
TINY = ["--dataset", "mnist-sample", "--limit-train", "192", "--batch-size", "32", "--epochs", "2",
        "--valid-size", "0.05"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny default-recipe run with Adam (whose 32 steps learn fast enough to check), with
    --dataset auto pointed at an empty folder (so it must fall back to mnist-sample and say so).
    Returns its folder."""
    folder = tmp_path_factory.mktemp("run") / "out"
    empty = tmp_path_factory.mktemp("no-data")
    flags = ["--dataset", "auto", "--data-dir", empty, "--no-download", "--limit-train", "512",
             "--epochs", "2", "--valid-size", "0.05", "--batch-size", "32", "--optimizer", "adam",
             "--lr", "3e-3", "--out", folder]
    code = train_main([str(flag) for flag in flags])
    assert code == 0
    return folder


# ----------------------------------------------------------------------------- outputs

def test_run_writes_every_output(run):
    for name in ("config.json", "metrics.jsonl", "summary.json", "last.npz", "best.npz", *FIGURES):
        assert (run / name).is_file(), name
    for name in FIGURES:
        content = (run / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5_000, name


@pytest.mark.parametrize("limit, per_epoch", [(96, 3), (100, 4)])      # 100 = 3 x 32 + a short batch of 4
def test_config_json_counts_the_run_s_steps(capsys, tmp_path, limit, per_epoch):
    flags = [*TINY, "--limit-train", limit, "--backend", "numpy", "--out", tmp_path]
    assert train(capsys, *flags)[0] == 0
    resolved = json.loads((tmp_path / "config.json").read_text())["resolved"]
    assert (resolved["train_images"], resolved["steps_per_epoch"], resolved["total_steps"]) == (limit, per_epoch,
                                                                                             2 * per_epoch)


def test_config_json_holds_every_setting(run):
    config = json.loads((run / "config.json").read_text())
    assert set(TrainConfig.__dataclass_fields__) <= config.keys()
    assert config["resolved"]["dataset"] == "mnist-sample" and config["resolved"]["train_images"] == 512


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_config_json_records_the_threads_the_run_computes_with(capsys, tmp_path, backend):
    """resolved.threads: --threads as given, at most the cores; resolved.numba: its version;
    resolved.command: the command as typed, to run again (not sys.argv, which names train.py)."""
    from numpylenet.backend import available_cores

    for threads in (1, 1000):
        flags = [*TINY, "--epochs", "1", "--backend", backend, "--threads", threads, "--out", tmp_path / str(threads)]
        assert train(capsys, *flags)[0] == 0
        resolved = json.loads((tmp_path / str(threads) / "config.json").read_text())["resolved"]
        assert resolved["threads"] == min(threads, available_cores())
        assert resolved["command"] == ["python", "-m", "numpylenet.train", *map(str, flags)]
    numba = sys.modules.get("numba")
    assert resolved["numba"] == (numba.__version__ if backend == "numba" else None)


def test_numba_num_threads_above_the_cores_trains_on_the_cores(tmp_path):
    """NUMBA_NUM_THREADS=1000 on two cores trained 17x slower, its threads only waiting for one
    another: without --threads the kernels run on the cores available, as --threads would cap."""
    from cli_runs import environment

    from numpylenet.backend import available_cores

    result = subprocess.run([sys.executable, "-m", "numpylenet.train", *TINY, "--epochs", "1", "--backend",
                             "numba", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env=environment(NUMBA_NUM_THREADS=str(4 * available_cores())), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["threads"] == available_cores()


def test_metrics_and_summary_are_consistent_and_sane(run):
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert all(math.isfinite(record[key]) for record in history
               for key in ("train_loss", "valid_loss", "valid_accuracy", "seconds"))
    # 32 Adam steps from chance level (loss ln 10 = 2.303, accuracy 10%) must have learned something.
    assert history[-1]["train_loss"] < math.log(10) and summary["test_accuracy"] > 0.3
    assert summary["best_epoch"] == 1 + int(np.argmin([record["valid_loss"] for record in history]))
    assert summary["test_correct"] == round(summary["test_accuracy"] * summary["test_images"])
    assert summary["test_images"] == 1000 and summary["train_images"] == 512 and summary["epochs"] == 2


def test_auto_dataset_fallback_is_announced(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "mnist-sample" and "no train-images" in summary["dataset_fallback"]


def test_fallback_banner_on_stderr(capsys, tmp_path):
    code, out, err = train(capsys, "--data-dir", tmp_path / "none", "--no-download", "--epochs", "1",
                           "--limit-train", "32", "--valid-size", "0.01", "--out", tmp_path / "run")
    assert code == 0 and "BUNDLED mnist-sample" in err and "NOT full MNIST" in out


def test_checkpoints_load_without_pickle_and_hold_the_state(run):
    for name in ("last.npz", "best.npz"):
        checkpoint = arrays(run / name)   # allow_pickle=False: raises if anything needs pickle
        assert {"model/conv1.weight", "model/fc2.bias", "optimizer/step", "optimizer/exp_avg.0",
                "config", "progress", "history"} <= checkpoint.keys()
        progress = json.loads(str(checkpoint["progress"]))
        assert progress["step"] == 0 and progress["dataset"] == "mnist-sample"
    assert json.loads(str(arrays(run / "last.npz")["progress"]))["epoch"] == 2


# ----------------------------------------------------------------------------- the recipes

def fashion_mnist_root(root: Path) -> Path:
    """Synthetic files in Fashion-MNIST's format and layout (the real ones are not on this machine):
    random 28x28 images whose class decides a bright square's position, so there is something
    to learn."""
    rng = np.random.default_rng(0)
    (root / "FashionMNIST" / "raw").mkdir(parents=True)
    for split, count in (("train", 600), ("t10k", 200)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            row, column = divmod(int(label), 5)
            image[4 + 10 * row: 12 + 10 * row, 2 + 5 * column: 6 + 5 * column] = 255
        write_idx(root / "FashionMNIST" / "raw" / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / "FashionMNIST" / "raw" / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.mark.parametrize("recipe", ["speedrun", "default"])
@pytest.mark.parametrize("dataset", ["mnist-sample", "fashion-mnist"])
def test_recipe_runs_unchanged_on_each_dataset(capsys, tmp_path, recipe, dataset):
    """A tiny run of each recipe (CI keeps them alive); on Fashion-MNIST with no flag but --dataset."""
    flags = ["--recipe", recipe, "--dataset", dataset, "--limit-train", "1024", "--epochs", "3",
             "--no-download", "--out", tmp_path / "run"]
    if dataset == "fashion-mnist":
        flags += ["--data-dir", fashion_mnist_root(tmp_path / "data")]
    code, out, _ = train(capsys, *flags)
    assert code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {name: config[name] for name in RECIPES[recipe] if name != "epochs"} == \
        {name: value for name, value in RECIPES[recipe].items() if name != "epochs"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == dataset and summary["recipe"] == recipe
    assert 0 < summary["train_seconds"] < summary["seconds_this_session"]
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Learning, not chance: the loss falls epoch after epoch and the test accuracy leaves 10%.
    losses = [record["train_loss"] for record in history]
    assert losses == sorted(losses, reverse=True) and summary["test_accuracy"] > 0.2, (losses, summary)


def test_a_run_normalises_by_its_own_training_split_and_its_checkpoint_keeps_the_statistics(capsys, tmp_path):
    """No recipe knows a data set's statistics: a run on synthetic Fashion-MNIST (pixels far from
    the real set's 0.2860, 0.3530) measures its own training split; evaluate reuses the checkpoint's
    statistics on another data set, and re-measures them for a checkpoint from before they were saved."""
    from numpylenet import data
    from numpylenet.checkpoint import save_checkpoint

    root = fashion_mnist_root(tmp_path / "data")
    code, out, _ = train(capsys, "--recipe", "speedrun", "--dataset", "fashion-mnist", "--data-dir", root,
                         "--limit-train", "256", "--epochs", "1", "--no-download", "--out", tmp_path / "run")
    assert code == 0
    images, _ = data.load_mnist(root, train=True, dataset="fashion-mnist")
    trained_on = images[data.split_train_valid(len(images), 0.1, seed=0)[0][:256]] / 255
    expected = {"normalize_mean": round(trained_on.mean(), 4), "normalize_std": round(trained_on.std(), 4)}
    assert expected["normalize_mean"] not in (0.1307, 0.2860)      # not a published statistic
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {name: config[name] for name in expected} == expected
    assert {name: saved(tmp_path / "run" / "best.npz", "config")[name] for name in expected} == expected
    assert f"normalised by mean {expected['normalize_mean']} std {expected['normalize_std']}" in out

    def evaluated(checkpoint, name):
        code, _, _ = run_evaluate(capsys, checkpoint, "--dataset", "mnist-sample", "--out", tmp_path / name)
        assert code == 0
        return json.loads(next((tmp_path / name).glob("eval-*.json")).read_text())

    report = evaluated(tmp_path / "run" / "best.npz", "eval")
    assert {name: report[name] for name in expected} == expected     # not mnist-sample's own
    old = load_checkpoint(tmp_path / "run" / "best.npz", training_state=False)
    old.config = {name: value for name, value in old.config.items() if name not in expected}
    save_checkpoint(tmp_path / "old.npz", old)
    old_report = evaluated(tmp_path / "old.npz", "eval-old")
    assert {name: old_report[name] for name in expected} == expected
    assert old_report["test_loss"] == report["test_loss"]


def test_configs_saved_before_the_new_settings_still_load():
    """A config.json from before label smoothing and the affine ranges existed lacks those keys:
    it loads, and they take the values that reproduce the old behaviour."""
    old = {name: value for name, value in dataclasses.asdict(make_config("default")).items()
           if name not in NEW_SETTINGS}
    config = make_config("default", base=old)
    assert all(getattr(config, name) == 0 for name in NEW_SETTINGS if name.startswith(("label", "affine")))
    assert config.nesterov is False
    # no statistics saved: the run measures its training split, as runs did before they were saved
    assert config.normalize_mean is None and config.normalize_std is None


NEW_SETTINGS = ("label_smoothing", "affine_degrees", "affine_translate", "affine_scale", "affine_shear",
                "nesterov", "normalize_mean", "normalize_std")


class LossIsTheBatchSize(NumpyLearner):
    """Trains as usual, but reports each step's loss as its batch size: a known loss per batch."""

    def train_step(self, x, y, lr):
        super().train_step(x, y, lr)
        return float(len(y))


def test_the_epoch_s_training_loss_weighs_each_batch_by_its_images(capsys, tmp_path):
    # 80 images in batches of 32: 32, 32 and a short 16, so the mean loss per image is
    # (32 * 32 + 32 * 32 + 16 * 16) / 80, not the mean of the three batches' losses.
    code, _, _ = train(capsys, "--dataset", "mnist-sample", "--limit-train", "80", "--batch-size", "32",
                       "--epochs", "1", "--valid-size", "0.01", "--out", tmp_path, make_learner=LossIsTheBatchSize)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert code == 0 and record["train_loss"] == pytest.approx((32 * 32 + 32 * 32 + 16 * 16) / 80)


class OverconfidentAfterEpochOne(NumpyLearner):
    """Trains in epoch 1 only (then at lr 0, so its weights stay); after epoch 1 its logits are
    1000 times the model's: the same predictions, so the same accuracy, at a far larger loss."""

    def train_step(self, x, y, lr):
        self.taken = getattr(self, "taken", 0) + 1
        return super().train_step(x, y, 0.0 if hasattr(self, "epoch_one_steps") else lr)

    def logits(self, x):
        if not hasattr(self, "epoch_one_steps"):       # the first validation: epoch 1's
            self.epoch_one_steps = self.taken
        return super().logits(x) * (1000 if self.taken > self.epoch_one_steps else 1)


def test_the_best_epoch_is_the_lowest_validation_loss_even_at_equal_accuracy(capsys, tmp_path):
    flags = [*TINY, "--backend", "numpy", "--dtype", "float64", "--out", tmp_path]
    assert train(capsys, *flags, make_learner=OverconfidentAfterEpochOne)[0] == 0
    first, second = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert second["valid_accuracy"] == first["valid_accuracy"] < 1 and second["valid_loss"] > first["valid_loss"]
    assert saved(tmp_path / "last.npz")["best_epoch"] == 1 and saved(tmp_path / "best.npz")["epoch"] == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "best.npz" in summary["weights_used"] and summary["weights_epoch"] == 1


# ----------------------------------------------------------------------------- resume

class InterruptAt(NumpyLearner):
    """The NumPy learner, plus a real SIGINT to this process just before global step ``at``."""

    at = 0

    def train_step(self, x, y, lr):
        self.taken = getattr(self, "taken", 0) + 1
        if self.taken == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().train_step(x, y, lr)


@pytest.mark.parametrize("interrupt_at_step", [4, 6])   # mid-epoch; the last step of epoch 1
def test_resume_after_ctrl_c_equals_uninterrupted_run(capsys, tmp_path, interrupt_at_step):
    flags = [*TINY, "--dtype", "float64", "--backend", "numpy"]
    assert train(capsys, *flags, "--out", tmp_path / "whole")[0] == 0
    interrupting = type("Interrupting", (InterruptAt,), {"at": interrupt_at_step})
    code, _, err = train(capsys, *flags, "--out", tmp_path / "split", make_learner=interrupting)
    assert code == 130 and "--resume" in err
    stopped = json.loads(str(arrays(tmp_path / "split" / "last.npz")["progress"]))
    assert (stopped["epoch"], stopped["step"]) == (0, interrupt_at_step)
    assert train(capsys, "--resume", tmp_path / "split" / "last.npz")[0] == 0
    whole, resumed = arrays(tmp_path / "whole" / "last.npz"), arrays(tmp_path / "split" / "last.npz")
    state = [name for name in whole if name.startswith(("model/", "optimizer/"))]
    assert state and state == [name for name in resumed if name.startswith(("model/", "optimizer/"))]
    for name in state:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_resume_inside_an_epoch_refuses_epochs_that_end_before_it(capsys, tmp_path):
    flags = [*TINY, "--epochs", "3", "--backend", "numpy", "--out", tmp_path]
    interrupting = type("Interrupting", (InterruptAt,), {"at": 8})     # 6 steps an epoch: inside epoch 2
    assert train(capsys, *flags, make_learner=interrupting)[0] == 130
    stopped = json.loads(str(arrays(tmp_path / "last.npz")["progress"]))
    assert stopped["epoch"] == 1 and stopped["step"] > 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    code, _, err = train(capsys, "--resume", tmp_path / "last.npz", "--epochs", "1")
    assert code == 2 and "--epochs must be at least 2" in err, err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_resume_can_extend_a_finished_run(capsys, tmp_path):
    assert train(capsys, *TINY, "--epochs", "1", "--out", tmp_path)[0] == 0
    code, out, _ = train(capsys, "--resume", tmp_path / "last.npz", "--epochs", "2")
    assert code == 0 and "epoch 2/2" in out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- faults

@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nan_loss_stops_and_keeps_last_good_checkpoint(capsys, tmp_path):
    # Adam moves every weight by about lr per step: 1e20 overflows float32 on the second step.
    code, _, err = train(capsys, *TINY, "--lr", "1e20", "--out", tmp_path)
    assert code == 1 and "loss became nan" in err and "last good checkpoint" in err
    kept = arrays(tmp_path / "last.npz")
    assert all(np.isfinite(value).all() for name, value in kept.items() if name.startswith("model/"))


class InfiniteLossAtStepTwo(NumpyLearner):
    def train_step(self, x, y, lr):
        loss = super().train_step(x, y, lr)
        self.taken = getattr(self, "taken", 0) + 1
        return math.inf if self.taken == 2 else loss


def test_an_infinite_training_loss_stops_the_run_as_nan_does(capsys, tmp_path):
    code, _, err = train(capsys, *TINY, "--out", tmp_path, make_learner=InfiniteLossAtStepTwo)
    assert code == 1 and "loss became inf" in err and "last good checkpoint" in err
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
    assert "--momentum" not in err                    # Adam: only the rate is to blame


def test_a_diverged_run_with_momentum_of_one_or_more_says_so(capsys, tmp_path):
    """At momentum >= 1 SGD's buffer grows without bound whatever the rate: "try a lower --lr"
    alone would send the user the wrong way."""
    code, _, err = train(capsys, *TINY, "--optimizer", "sgd", "--momentum", "1.5", "--out", tmp_path,
                         make_learner=InfiniteLossAtStepTwo)
    assert code == 1 and "Try a lower --lr, or a --momentum below 1" in err, err


@pytest.mark.parametrize("flags, warned", [([], True), (["--affine-degrees", "5"], False)])
def test_affine_augmentation_without_a_range_is_warned_of(capsys, tmp_path, flags, warned):
    """The seed recipe's affine ranges are all 0: --augmentation affine alone would distort nothing."""
    code, _, err = train(capsys, *TINY, "--recipe", "seed", "--augmentation", "affine", *flags, "--out", tmp_path)
    assert code == 0 and ("distorts nothing" in err) == warned, err


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr must be a finite number"),              # the setting's own check, named by its flag
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1]"),
    (["--valid-size", "0"], "--valid-size"),
    (["--valid-size", "1"], "--valid-size"),
    (["--backend", "cuda"], "--backend"),
    (["--epochs", "three"], "--epochs"),
    (["--momentum", "0.5", "--optimizer", "adam"], "--momentum"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov"),
    (["--affine-degrees", "30", "--augmentation", "shift"], "--affine-degrees 30"),
    (["--affine-shear", "5", "--recipe", "default", "--no-augment"], "--affine-shear 5"),
    (["--dataset", "mnist", "--no-download", "--data-dir", "{tmp}/missing"], "missing"),
    (["--resume", "{tmp}/nothing.npz"], "does not exist"),
]


@pytest.mark.parametrize("flags, mentions", BAD_FLAGS)
def test_bad_flag_gives_one_line_error(capsys, tmp_path, flags, mentions):
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    code, out, err = train(capsys, *flags, "--out", tmp_path / "run")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{PROG}: error: ") and mentions in err
    assert not (tmp_path / "run").exists()


def corrupt(path: Path, target: Path, how: str) -> Path:
    """A damaged copy of the checkpoint ``path`` at ``target``."""
    content = path.read_bytes()
    if how == "truncated":
        target.write_bytes(content[: len(content) // 2])
    elif how == "garbage":
        target.write_bytes(os.urandom(4096))
    elif how == "flipped":   # a bit flip inside a compressed member: caught by the zip CRC
        middle = len(content) // 2
        target.write_bytes(content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1:])
    elif how == "missing-config":
        entries = {k: v for k, v in arrays(path).items() if k != "config"}
        np.savez(target, **entries)
    elif how == "wrong-shape":
        entries = arrays(path)
        entries["model/fc1.weight"] = np.zeros((84, 121), dtype=np.float32)
        np.savez(target, **entries)
    elif how == "bad-json":
        entries = arrays(path)
        entries["progress"] = np.array("{not json")
        np.savez(target, **entries)
    elif how == "empty":
        target.write_bytes(b"")
    return target


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped", "missing-config", "wrong-shape",
                                 "bad-json", "empty"])
def test_corrupt_checkpoint_gives_clear_error(capsys, tmp_path, run, how):
    damaged = corrupt(run / "last.npz", tmp_path / "damaged.npz", how)
    for main, args in ((train_main, ["--resume", str(damaged), "--out", str(tmp_path / "x")]),
                       (evaluate_main, [str(damaged), "--out", str(tmp_path / "x")])):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and str(damaged) in err, err


def test_resume_with_a_different_network_is_refused(capsys, tmp_path, run):
    code, _, err = train(capsys, "--resume", run / "last.npz", "--activation", "tanh",
                         "--out", tmp_path / "x")
    assert code == 2 and "different network" in err and "activation" in err


def test_help_imports_nothing_heavy():
    script = ("import runpy, sys\nsys.argv = ['numpylenet.train', '--help']\n"
              "try:\n    runpy.run_module('numpylenet.train', run_name='__main__')\n"
              "except SystemExit:\n    pass\n"
              "print(sorted(m for m in ('matplotlib', 'torch', 'numba', 'tqdm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.stdout.strip().endswith("[]"), result.stdout[-300:]
    for flag in ("--epochs", "--batch-size", "--lr", "--optimizer", "--momentum", "--weight-decay",
                 "--valid-size", "--seed", "--augment", "--activation", "--pool", "--dtype",
                 "--backend", "--threads", "--dataset", "--data-dir", "--download", "--out",
                 "--resume", "--recipe"):
        assert flag in result.stdout, flag


def test_help_states_each_setting_s_default_as_the_runs_resolve_it(tmp_path):
    """Every "[default: X]" in --help of a recipe setting is what a run without that flag gets,
    and every "(recipe seed: X, default: Y, ...)" lists what each recipe's run gets."""
    from numpylenet.train import build_parser, resolve_config

    parser = build_parser()
    for action in parser._actions:
        name, text = action.dest, " ".join((action.help or "").split())
        if name not in TrainConfig.__dataclass_fields__ or name == "recipe":
            continue
        for recipe in RECIPES:
            args = parser.parse_args(["--recipe", recipe])
            resolved = getattr(resolve_config(args), name)
            default = re.search(r"\[default: ([^\]]+)\]", text)
            if default and not default.group(1).startswith(("$", "runs/", "numba")):
                if recipe == "default":
                    stated = {"yes": "True", "no": "False", "all": "None", "leave as is": "None"}.get(default.group(1), default.group(1))
                    assert stated == str(resolved), (name, text, resolved)
            listed = re.search(rf"\b{recipe}: ([^,)]+)", text) if "(recipe " in text else None
            if listed:
                assert listed.group(1) == str(resolved), (name, recipe, text, resolved)


# ----------------------------------------------------------------------------- evaluation

def test_evaluate_reproduces_the_run_and_writes_outputs(capsys, tmp_path, run):
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_main([str(run / "best.npz"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {100 * summary['test_accuracy']:.2f}%" in out and "class 9:" in out
    report = json.loads((tmp_path / "eval-best-mnist-sample.json").read_text())
    assert report["test_accuracy"] == summary["test_accuracy"]
    assert np.sum(report["confusion_matrix"]) == 1000
    assert (tmp_path / "eval-best-mnist-sample-confusion_matrix.png").read_bytes().startswith(PNG_SIGNATURE)


def test_confusion_matrix_rows_are_true_classes_and_per_class_accuracy_is_recall():
    labels, predictions = np.array([0, 0, 0, 1, 2]), np.array([0, 1, 1, 1, 0])
    matrix = confusion_matrix(labels, predictions, num_classes=3)
    assert matrix.tolist() == [[1, 2, 0], [0, 1, 0], [1, 0, 0]]     # [true class, predicted class]
    assert per_class_accuracy(matrix) == {"0": 1 / 3, "1": 1.0, "2": 0.0}
    assert per_class_accuracy(confusion_matrix([1], [1], num_classes=2)) == {"0": None, "1": 1.0}


def test_evaluate_reproduces_the_test_of_a_run_with_random_evaluation_crops(capsys, tmp_path):
    # The seed recipe evaluates on random crops: the run's final test and evaluate must draw the
    # same ones (the test stream of the run's seed), so the same weights give the same figures.
    run = tmp_path / "run"
    assert train(capsys, "--recipe", "seed", *TINY, "--backend", "numpy", "--out", run)[0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_main([str(run / "best.npz"), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval-best-mnist-sample-random-crops.json").read_text())
    assert (report["test_loss"], report["test_accuracy"]) == (summary["test_loss"], summary["test_accuracy"])


def test_evaluate_counts_each_class_out_of_its_test_images(capsys, tmp_path, run):
    assert evaluate_main([str(run / "best.npz"), "--out", str(tmp_path)]) == 0
    printed = re.findall(r"class (\d): .*\((\d+)/(\d+)\)", capsys.readouterr().out)
    _, test_labels = load_mnist(dataset="mnist-sample", train=False)
    per_class = np.bincount(test_labels, minlength=10)
    assert [int(total) for _, _, total in printed] == per_class.tolist()
    matrix = np.array(json.loads((tmp_path / "eval-best-mnist-sample.json").read_text())["confusion_matrix"])
    assert matrix.sum(axis=1).tolist() == per_class.tolist()
    assert [int(correct) for _, correct, _ in printed] == np.diag(matrix).tolist()


needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is not installed (pip install -e '.[reference]')")


def torch_accuracy(weights: dict, normalize: bool) -> float:
    """Accuracy of the notebook's torch LeNet with ``weights`` on the mnist-sample test set,
    prepared by torchvision (Pad(2), ToTensor, Normalize): an independent evaluation."""
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from numpylenet.data import load_mnist
    from reference.lenet import LeNet

    images, labels = load_mnist(train=False, dataset="mnist-sample")
    steps = [T.Pad(2), T.ToTensor()] + ([T.Normalize((0.1307,), (0.3081,))] if normalize else [])
    prepare = T.Compose(steps)
    x = torch.stack([prepare(Image.fromarray(image)) for image in images])
    model = LeNet()
    model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    with torch.no_grad():
        return float((model(x).argmax(1).numpy() == labels).mean())


@needs_torch
@pytest.mark.parametrize("flags, mentions", [(["--epochs", "0"], "--epochs"), (["--num-workers", "-1"], "--num-workers"),
                                             (["--data-dir", "{tmp}/none"], "no MNIST in")])
def test_the_seed_notebook_s_bad_input_is_a_one_line_error(capsys, tmp_path, flags, mentions):
    """--epochs 0 printed an untrained model's accuracy, -1 workers a torch traceback, missing data
    exit status 1."""
    from reference.seed_notebook import main as notebook_main

    with pytest.raises(SystemExit) as exit_:
        notebook_main([flag.replace("{tmp}", str(tmp_path)) for flag in flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and mentions in err and len(err.strip().splitlines()) == 1, err


@needs_torch
def test_evaluate_agrees_with_torch_on_a_checkpoint(capsys, tmp_path, run):
    evaluate_main([str(run / "best.npz"), "--out", str(tmp_path)])
    ours = json.loads((tmp_path / "eval-best-mnist-sample.json").read_text())["test_accuracy"]
    assert abs(ours - torch_accuracy(load_checkpoint(run / "best.npz").model, normalize=True)) <= 0.002


@needs_torch
def test_evaluate_reads_a_notebook_state_dict(capsys, tmp_path, run):
    import torch

    from reference.lenet import LeNet

    model = LeNet()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_checkpoint(run / "best.npz").model.items()})
    torch.save(model.state_dict(), tmp_path / "notebook.pt")
    code = evaluate_main([str(tmp_path / "notebook.pt"), "--dataset", "mnist-sample",
                          "--eval-crop", "center", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "eval-notebook-mnist-sample.json").read_text())
    ours = report["test_accuracy"]
    assert report["trained"] is None            # a state_dict does not know its epoch
    weights = {name: value.numpy() for name, value in model.state_dict().items()}
    assert abs(ours - torch_accuracy(weights, normalize=False)) <= 0.002


@needs_torch
def test_a_notebook_state_dict_is_read_in_its_saved_dtype(tmp_path):
    import torch

    from reference.lenet import LeNet
    from reference.notebook_weights import load_notebook_state_dict

    torch.manual_seed(0)
    state = LeNet().double().state_dict()
    torch.save(state, tmp_path / "lenet64.pt")
    weights = load_notebook_state_dict(tmp_path / "lenet64.pt")
    assert list(weights) == list(state)
    for name, value in state.items():
        assert weights[name].dtype == np.float64 and np.array_equal(weights[name], value.numpy()), name


def test_evaluate_names_its_reports_by_what_it_evaluated(capsys, tmp_path, run):
    """Centred and random crops of one checkpoint are two evaluations: two reports, neither lost."""
    for crop in ("random", "center"):
        assert evaluate_main([str(run / "best.npz"), "--eval-crop", crop, "--out", str(tmp_path)]) == 0
    random = json.loads((tmp_path / "eval-best-mnist-sample-random-crops.json").read_text())
    centred = json.loads((tmp_path / "eval-best-mnist-sample.json").read_text())
    assert (random["eval_crop"], centred["eval_crop"]) == ("random", "center")
    capsys.readouterr()


def test_evaluate_blames_a_bad_backend_not_the_checkpoint(capsys, monkeypatch, tmp_path, run):
    monkeypatch.setenv("NUMPYLENET_BACKEND", "foo")
    code, _, err = run_evaluate(capsys, run / "best.npz", "--out", tmp_path)
    assert code == 2 and "NUMPYLENET_BACKEND" in err and "does not hold LeNet-5 weights" not in err, err


@needs_torch
def test_reference_train_s_help_describes_the_torch_trainer(capsys):
    from reference.train import main as reference_main

    with pytest.raises(SystemExit):
        reference_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "PyTorch reference" in out and "(NumPy)" not in out and "--backend is accepted" in out


@needs_torch
def test_evaluate_rejects_a_state_dict_of_another_network(capsys, tmp_path):
    import torch

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([str(tmp_path / "other.pt"), "--dataset", "mnist-sample"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not a state_dict of the notebook's LeNet" in err


# ----------------------------------------------------------------------------- the torch side

@needs_torch
def test_one_cycle_schedule_matches_torch():
    import torch

    from numpylenet.schedule import one_cycle_lr

    for total in (7, 100, 5_064):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.Adam([param], lr=1.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=total, pct_start=0.25, anneal_strategy="cos",
            cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
        for step in range(total):
            assert one_cycle_lr(step, total, 3e-3) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                    rel=1e-12)
            optimizer.step()
            scheduler.step()


@needs_torch
@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
def test_the_torch_learner_resumed_from_its_state_continues_as_if_never_stopped(optimizer):
    """reference.train's learner saved after 3 steps and restored continues as the uninterrupted
    one: torch's own optimiser, whose Adam needs the step count back for its bias correction."""
    from reference.train import TorchLearner

    config = make_config("speedrun", optimizer=optimizer, dtype="float64", seed=1,
                         **({"momentum": 0.9} if optimizer == "sgd" else {}))
    rng = np.random.default_rng(0)
    steps = [(rng.standard_normal((8, 1, 32, 32)), rng.integers(0, 10, 8), lr)
             for lr in (1e-3, 2e-3, 3e-3, 2e-3, 1e-3)]
    whole, first = TorchLearner(config), TorchLearner(config)
    for x, y, lr in steps:
        whole.train_step(x, y, lr)
    for x, y, lr in steps[:3]:
        first.train_step(x, y, lr)
    resumed = TorchLearner(config)
    resumed.load_state(first.model_state(), first.optimizer_state())
    for x, y, lr in steps[3:]:
        resumed.train_step(x, y, lr)
    for name, value in whole.model_state().items():
        np.testing.assert_array_equal(resumed.model_state()[name], value, err_msg=name)


@needs_torch
@pytest.mark.parametrize("recipe", ["default", "speedrun", "seed"])
def test_reference_train_follows_the_same_trajectory(capsys, tmp_path, recipe):
    """Same batches, same initial weights, torch-exact optimiser and loss (label smoothing
    included): in float64 the NumPy and the torch runs end at the same weights to round-off."""
    from reference.train import main as reference_main

    flags = ["--recipe", recipe, *TINY, "--epochs", "1", "--dtype", "float64", "--backend", "numpy"]
    assert train(capsys, *flags, "--out", tmp_path / "ours")[0] == 0
    assert reference_main([*flags, "--out", str(tmp_path / "torch")]) == 0
    ours, theirs = arrays(tmp_path / "ours" / "last.npz"), arrays(tmp_path / "torch" / "last.npz")
    for name in (k for k in ours if k.startswith(("model/", "optimizer/"))):
        scale = max(np.abs(theirs[name]).max(), 1e-30)
        assert np.abs(ours[name] - theirs[name]).max() / scale < 1e-9, name


@needs_torch
def test_validation_loss_is_the_label_smoothed_objective(capsys, tmp_path):
    """With label smoothing the model is selected on the training objective: each epoch's
    valid_loss equals torch's CrossEntropyLoss(label_smoothing=0.1) of that epoch's weights on the
    validation images, prepared by torchvision (Pad(2), ToTensor, Normalize)."""
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from numpylenet.data import load_mnist, split_train_valid
    from reference.lenet import LeNet

    flags = ["--recipe", "speedrun", "--dataset", "mnist-sample", "--limit-train", "512", "--epochs", "1",
             "--no-download", "--out", tmp_path]
    assert train(capsys, *flags)[0] == 0
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    images, labels = load_mnist(dataset="mnist-sample")
    _, valid = split_train_valid(len(images), 0.1, seed=0)
    prepare = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
    x = torch.stack([prepare(Image.fromarray(image)) for image in images[valid]])
    model = LeNet()
    weights = load_checkpoint(tmp_path / "last.npz").model
    model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    with torch.no_grad():
        logits = model(x)
    smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.from_numpy(labels[valid])).item()
    plain = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[valid])).item()
    assert history[-1]["valid_loss"] == pytest.approx(smoothed, rel=1e-4)
    assert abs(smoothed - plain) > 1e-2     # the two really differ, so the check can tell them apart


# ----------------------------------------------------------------------------- compile notice

@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_a_compile_is_announced_while_it_runs(capsys, tmp_path, monkeypatch, run, tool):
    """A kernel compile (here: one made to last 1.5 s longer than the announcement's delay) is
    announced while it is still running - not after - naming the dtype, with its expected time."""
    pytest.importorskip("numba")
    from numpylenet import cli
    from numpylenet.engine import NumbaLeNet5

    compile_kernels, heard = NumbaLeNet5.compile.__func__, []

    def slow_compile(cls, *args, **kwargs):
        time.sleep(cli.ANNOUNCE_AFTER_SECONDS + 1.5)
        heard.append(capsys.readouterr().out)        # what the user saw while compiling
        compile_kernels(cls, *args, **kwargs)

    monkeypatch.setattr(NumbaLeNet5, "compile", classmethod(slow_compile))
    if tool == "train":
        code, out, err = train(capsys, *TINY, "--backend", "numba", "--out", tmp_path / "out")
    else:
        code, out, err = run_evaluate(capsys, run / "best.npz", "--backend", "numba",
                                      "--out", tmp_path / "eval")
    assert code == 0, err
    assert len(heard) == 1 and "compiling Numba kernels for float32" in heard[0], heard
    assert "compiling Numba kernels" not in out          # once, during the compile


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_during_the_build_waits_for_its_end(capsys, signum, raised):
    """Raised inside Numba's compiler, a KeyboardInterrupt is dropped by a ctypes callback or
    breaks the compiler: the first Ctrl-C or SIGTERM lets the build finish, then stops the run."""
    from numpylenet.cli import build_with_cache_recovery

    done = []

    def build():
        os.kill(os.getpid(), signum)
        for _ in range(3):
            time.sleep(0.05)            # Python runs the signal's handler meanwhile
            done.append(True)
        return "built"

    with pytest.raises(raised):
        build_with_cache_recovery(build, print)
    assert done == [True] * 3
    assert "stopping once the Numba compile in progress is done" in capsys.readouterr().err


def test_a_second_ctrl_c_ends_the_build_at_once_whatever_the_compiler_does():
    """A KeyboardInterrupt raised while Numba compiles mostly lands in an LLVM callback whose
    ctypes wrapper drops it: the second Ctrl-C must end the process itself, at once, exit 130."""
    script = (
        "import os, signal, time\n"
        "from numpylenet.cli import build_with_cache_recovery\n"
        "def build():                          # a compiler that swallows every interruption\n"
        "    for _ in range(2):\n"
        "        try:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            time.sleep(0.2)\n"
        "        except BaseException:\n"
        "            pass\n"
        "    time.sleep(20)\n"
        "build_with_cache_recovery(build, print)\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 130 and time.perf_counter() - started < 10, result.stderr
    assert "Ctrl-C again: aborting the compile" in result.stderr and "Traceback" not in result.stderr


def test_a_quick_build_is_not_announced_and_numpy_compiles_nothing(capsys):
    from numpylenet.cli import ANNOUNCE_AFTER_SECONDS, build_with_cache_recovery, compile_announcement

    assert build_with_cache_recovery(lambda: 7, print, announce="compiling!") == 7
    time.sleep(ANNOUNCE_AFTER_SECONDS + 0.2)
    assert "compiling!" not in capsys.readouterr().out   # the timer was cancelled
    assert compile_announcement("numpy", "float32", "sgd") is None
