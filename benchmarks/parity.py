"""Accuracy parity: numpylenet against the torch reference, same recipes, same seeds, full MNIST.

    python -m benchmarks.parity [--recipes default speedrun seed] [--seeds 0 1 2] [--data-dir DIR]
                                [--threads 2] [--backend numba] [--notebook] [--fresh]
                                [--quick] [--out DIR]

For every recipe and seed, trains ``python -m numpylenet.train`` and ``python -m reference.train``
(identical batches and initial weights; see ``reference/train.py``) one after the other, each in
its own process, and reads their ``summary.json`` and ``metrics.jsonl``. ``--notebook`` adds the
seed notebook's own torchvision pipeline (``python -m reference.seed_notebook``) for the same
seeds: the baseline the seed recipe has to land on.

Writes ``<out>/parity.json`` (the Markdown table, every run's figures, the machine, the threads,
the versions, the date) and ``<out>/parity.png`` (both frameworks' loss curves, mean over seeds,
per recipe); ``--out`` defaults to ``benchmarks/results``. The runs themselves live in
``<out>/tmp/parity/``; a run whose ``summary.json`` exists is reused while its saved settings are
still the recipe's, so an interrupted benchmark picks up where it stopped (``--fresh`` redoes
all). ``--quick`` (the CI smoke test) trains one seed for one epoch on 320 images of the bundled mnist-sample: its figures mean nothing.

Targets (issues 4 and 13): the default and speedrun recipes, means within 0.15 percentage points;
seed recipe, the difference of means within the seed-to-seed spread.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from numpylenet.cli import non_negative_int
from numpylenet.names import BACKEND_NAMES
from numpylenet.recipes import RECIPES

NAME = "parity"
TRAINERS = {"numpylenet": "numpylenet.train", "torch": "reference.train"}
NOTEBOOK = "notebook (torchvision pipeline)"
TOLERANCE_PP = 0.15
# Recipes whose means must agree within TOLERANCE_PP; the others (the seed recipe, whose seeds
# spread over percentage points) within their seed-to-seed spread.
TIGHT_RECIPES = ("default", "speedrun")
QUICK_FLAGS = ["--dataset", "mnist-sample", "--limit-train", "320", "--epochs", "1"]


def is_current_run(folder: Path, recipe: str) -> bool:
    """Whether ``folder`` holds a finished run of ``recipe`` as the recipe reads today: a run saved
    before the recipe changed is trained again, not reported under the new recipe's name."""
    from numpylenet.recipes import RECIPES

    if not (folder / "summary.json").is_file() or not (folder / "config.json").is_file():
        return False
    saved = json.loads((folder / "config.json").read_text())
    return all(saved.get(name) == value for name, value in RECIPES[recipe].items())


def train(trainer: str, recipe: str, seed: int, args: argparse.Namespace, runs: Path) -> dict:
    """One training run in a fresh process (or the saved result of an earlier one)."""
    folder = runs / f"{recipe}-seed{seed}-{trainer}"
    summary_path = folder / "summary.json"
    if not is_current_run(folder, recipe):
        shutil.rmtree(folder, ignore_errors=True)
        data = QUICK_FLAGS if args.quick else ["--dataset", "mnist", "--data-dir", str(common.data_dir(args.data_dir))]
        command = [sys.executable, "-m", TRAINERS[trainer], "--recipe", recipe, "--seed", str(seed),
                   *data, "--no-download", "--threads", str(args.threads), "--out", str(folder)]
        if trainer == "numpylenet" and args.backend:
            command += ["--backend", args.backend]
        print(" ".join(command[1:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, cwd=common.REPO, check=True, stderr=subprocess.DEVNULL)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    summary = json.loads(summary_path.read_text())
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"trainer": trainer, "recipe": recipe, "seed": seed,
            "test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"],
            "seconds": summary.get("train_seconds", summary["seconds"]), "backend": summary["backend"],
            "history": history}


def notebook(seed: int, args: argparse.Namespace, runs: Path) -> dict:
    """The seed notebook's own pipeline for one seed (or its saved result)."""
    result_path = runs / f"notebook-seed{seed}.json"
    if not result_path.is_file():
        command = [sys.executable, "-m", "reference.seed_notebook", "--seed", str(seed),
                   "--data-dir", str(common.data_dir(args.data_dir))]
        print(" ".join(command[1:]), flush=True)
        environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        output = subprocess.run(command, cwd=common.REPO, check=True, capture_output=True, text=True,
                                env=environment).stdout
        result_path.write_text(output.strip().splitlines()[-1] + "\n")
    result = json.loads(result_path.read_text())
    return {"trainer": NOTEBOOK, "recipe": "seed", "seed": seed,
            "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
            "seconds": result["seconds"], "backend": f"torch {result['torch']}", "history": []}


def summarise(runs: list[dict]) -> dict:
    accuracies = 100 * np.array([run["test_accuracy"] for run in runs])
    return {"mean": float(accuracies.mean()), "spread": float(accuracies.max() - accuracies.min()),
            "std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
            "per_seed": accuracies.round(2).tolist(),
            "mean_seconds": float(np.mean([run["seconds"] for run in runs])),
            "seconds_per_seed": [round(run["seconds"], 1) for run in runs]}


def verdicts(table: dict) -> dict:
    """Per recipe: the gap between the two frameworks' means, and whether it meets the target."""
    results = {}
    for recipe, rows in table.items():
        if "numpylenet" not in rows or "torch" not in rows:
            continue
        ours, theirs = rows["numpylenet"], rows["torch"]
        gap = abs(ours["mean"] - theirs["mean"])
        if recipe in TIGHT_RECIPES:
            limit, rule = TOLERANCE_PP, f"<= {TOLERANCE_PP} pp"
        else:
            limit = max(ours["spread"], theirs["spread"])
            rule = f"<= the larger seed-to-seed spread ({limit:.2f} pp)"
        results[recipe] = {"gap_pp": gap, "rule": rule, "met": bool(gap <= limit)}
    return results


def plot(runs: list[dict]):
    """Both frameworks' loss curves (train within epochs, validation per epoch), mean over seeds."""
    from matplotlib.figure import Figure

    from numpylenet.plots import trace

    recipes = sorted({run["recipe"] for run in runs if run["history"]})
    figure = Figure(figsize=(6 * len(recipes), 4.5), layout="constrained")
    for axes, recipe in zip(np.atleast_1d(figure.subplots(1, len(recipes))), recipes):
        for colour, trainer in zip(("C0", "C3"), TRAINERS):
            histories = [run["history"] for run in runs if run["recipe"] == recipe and run["trainer"] == trainer]
            traces = [trace(history) for history in histories]
            axes.plot(traces[0][0], np.mean([loss for _, loss in traces], axis=0), "-", color=colour,
                      alpha=0.8, label=f"{trainer}: train loss")
            epochs = [record["epoch"] for record in histories[0]]
            valid = np.mean([[record["valid_loss"] for record in history] for history in histories], axis=0)
            axes.plot(epochs, valid, "s--", color=colour, label=f"{trainer}: validation loss")
        axes.set(xlabel="epoch", ylabel="cross-entropy (mean over seeds)", yscale="log",
                 title=f"recipe {recipe}")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("numpylenet vs torch reference: same recipe, batches and initial weights")
    return figure


def markdown(table: dict, checks: dict) -> str:
    rows = [[recipe, trainer, ", ".join(f"{a:.2f}" for a in row["per_seed"]), f"{row['mean']:.2f}",
             f"{row['spread']:.2f}", ", ".join(f"{s:.1f}" for s in row["seconds_per_seed"])]
            for recipe, trainers in table.items() for trainer, row in trainers.items()]
    results = common.markdown_table(["recipe", "trainer", "test accuracy per seed (%)", "mean (%)",
                                     "spread (pp)", "training seconds per seed"], rows, align="llllrl")
    verdict_rows = [[recipe, f"{check['gap_pp']:.2f}", check["rule"], "yes" if check["met"] else "NO"]
                    for recipe, check in checks.items()]
    verdicts_table = common.markdown_table(["recipe", "gap between the means (pp)", "target", "met"],
                                           verdict_rows, align="lrll")
    note = ("Training seconds: summary.json's train_seconds, first step to last with the per-epoch "
            "validation and checkpoints (for the notebook's own pipeline: its whole run), on "
            "whatever load the machine had.")
    return f"{results}\n\n{verdicts_table}\n\n{note}"


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0], repeats=1)
    parser.add_argument("--recipes", nargs="+", default=["default", "speedrun", "seed"],
                        choices=tuple(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None,
                        help="root holding MNIST/raw (default $NUMPYLENET_DATA, else ../shared/data)")
    parser.add_argument("--backend", default=None, choices=BACKEND_NAMES,
                        help="numpylenet backend [default: the library's]")
    parser.add_argument("--notebook", action="store_true",
                        help="also run the seed notebook's own torchvision pipeline for each seed")
    parser.add_argument("--fresh", action="store_true", help="discard saved runs and train again")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)   # the trainers get --threads; this makes meta report the same
    if args.quick:
        args.seeds, args.notebook = args.seeds[:1], False
    runs_folder = args.out / "tmp" / ("parity-quick" if args.quick else "parity")
    if args.fresh:
        shutil.rmtree(runs_folder, ignore_errors=True)
    runs_folder.mkdir(parents=True, exist_ok=True)

    runs = [train(trainer, recipe, seed, args, runs_folder)
            for recipe in args.recipes for seed in args.seeds for trainer in TRAINERS]
    if args.notebook and "seed" in args.recipes:
        runs += [notebook(seed, args, runs_folder) for seed in args.seeds]
    table: dict[str, dict[str, dict]] = {}
    for recipe in args.recipes:
        for trainer in dict.fromkeys(run["trainer"] for run in runs):
            chosen = [run for run in runs if run["recipe"] == recipe and run["trainer"] == trainer]
            if chosen:
                table.setdefault(recipe, {})[trainer] = summarise(chosen)
    checks = verdicts(table)
    text = markdown(table, checks)
    meta = common.metadata(args)
    content = {"benchmark": NAME, "meta": meta, "dataset": "mnist-sample" if args.quick else "mnist",
               "seeds": args.seeds,
               "numpylenet_backend": next(run["backend"] for run in runs if run["trainer"] == "numpylenet"),
               "table": table, "checks": checks, "markdown": text,
               "runs": [{k: v for k, v in run.items() if k != "history"} for run in runs]}
    path = common.write_json(args.out, NAME, content)
    common.save_figure(plot(runs), args.out, NAME)
    print(f"{meta['machine_summary']}; threads {args.threads}\n\n{text}\n\nwrote {path}")
    return content


if __name__ == "__main__":
    main()
