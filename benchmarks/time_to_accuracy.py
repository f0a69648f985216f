"""Time to accuracy: test accuracy against training seconds, numpylenet against torch eager, torch.compile and JAX.

    python -m benchmarks.time_to_accuracy [--recipes speedrun default] [--seeds 0 1 2]
        [--contenders numpylenet torch torch.compile jax] [--evaluations 25] [--data-dir DIR]
        [--threads 2] [--quick] [--out DIR]

Every contender trains the same recipe on the same batches from the same initial weights
(:mod:`numpylenet.pipeline`; the torch learners are ``reference.train``'s, the way
``benchmarks/parity.py`` runs them; JAX's is :class:`benchmarks.peers.JaxLearner`, when jax and
optax are installed, else it is left out with a line saying so) and takes the same steps as
``python -m numpylenet.train``:
the recipe's learning rate, one ``train_step`` per batch, and after every epoch the validation
pass the trainer makes (it belongs to a run's ``train_seconds``, so it is on the clock here too).

**The clock.** It runs while the contender prepares batches, trains and validates. It is *paused*
while the test accuracy is measured: at ``--evaluations`` evenly spaced steps and after the last
one, the clock stops, the test set (prepared once, before the start) goes through the model, and
the clock resumes. Evaluation time is therefore excluded. Compilation happens before the clock
starts, for every contender alike: numpylenet's Numba kernels load from their disk cache (or
compile), and torch.compile and ``jax.jit`` first compile their graphs for every batch shape of
the run on a throwaway learner (that learner's seconds are reported as ``compile_seconds``).

**Time to X%** is the clock at the first evaluation whose test accuracy reaches X%; with
evaluations every T seconds it overstates the true time by at most T. A recipe that never gets
there shows "-". The headline is numpylenet's time to 99.0%, the median over seeds, of the
fastest recipe.

Writes ``time_to_accuracy.json`` (every curve, every time, the table, the machine) and
``time_to_accuracy.png`` (accuracy against seconds, one panel per recipe). ``--quick`` (the CI smoke
test) trains numpylenet and torch eager on 320 images of the bundled mnist-sample for one epoch,
one seed, three evaluations (and JAX, if installed): its figures mean nothing.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks import common
from numpylenet.cli import non_negative_int, positive_int

NAME = "time_to_accuracy"
CONTENDERS = ("numpylenet", "torch", "torch.compile", "jax")
# The contenders that compile one graph per batch shape on its first call: compiled before the clock.
COMPILING = ("torch.compile", "jax")
THRESHOLDS = (0.985, 0.990, 0.993)
HEADLINE_THRESHOLD = 0.990


class Clock:
    """A stopwatch that can be paused: ``seconds`` counts only the time it ran."""

    def __init__(self):
        self.seconds, self._started = 0.0, None

    def start(self) -> None:
        self._started = time.perf_counter()

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self._started
        self._started = None


def make_learner(contender: str, config) -> tuple[object, float]:
    """The learner of one contender, ready to train, and the seconds spent compiling for it."""
    if contender == "numpylenet":
        from numpylenet.loop import NumpyLearner
        learner = NumpyLearner(config)
        return learner, learner.compile_seconds
    if contender == "jax":
        from benchmarks.peers import JaxLearner
        return JaxLearner(config), 0.0
    from reference.train import TorchLearner
    if contender == "torch":
        return TorchLearner(config), 0.0
    return TorchLearner(config, compile=True), 0.0


def compile_graphs(contender: str, config, splits) -> float:
    """Compile a compiling contender's graphs (torch.compile's, jax.jit's) for every shape the run
    will meet, on a throwaway learner: a full batch, the epoch's last (shorter) batch, and the
    evaluation batches. Returns the seconds."""
    from numpylenet.pipeline import EVAL_BATCH_SIZE

    started = time.perf_counter()
    learner = make_learner(contender, config)[0]
    train_count, batch_size = len(splits.train_images), config.batch_size
    sizes = {min(batch_size, train_count), train_count % batch_size or batch_size}
    for size in sizes:
        learner.train_step(np.zeros((size, 1, 32, 32), np.dtype(config.dtype)),
                           np.zeros(size, np.int64), 0.0)
    for count in (len(splits.valid_images), len(splits.test_images)):
        for size in {min(EVAL_BATCH_SIZE, count), count % EVAL_BATCH_SIZE or EVAL_BATCH_SIZE}:
            learner.logits(np.zeros((size, 1, 32, 32), np.dtype(config.dtype)))
    return time.perf_counter() - started


def run(contender: str, config, splits, evaluations: int) -> dict:
    """Train one contender on one recipe and seed; its accuracy curve against the paused clock."""
    from numpylenet.loop import evaluate_batches
    from numpylenet.pipeline import Stream, evaluation_batches, generator, num_batches, training_batches
    from numpylenet.schedule import learning_rate

    compile_seconds = compile_graphs(contender, config, splits) if contender in COMPILING else 0.0
    learner, kernel_seconds = make_learner(contender, config)
    threads = common.thread_report(config.threads)      # as this learner left them
    test_batches = list(evaluation_batches(splits.test_images, splits.test_labels, config,
                                           rng=generator(config.seed, Stream.TEST)))
    steps_per_epoch = num_batches(len(splits.train_images), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    measure_at = set(np.linspace(0, total_steps, evaluations + 1).round().astype(int)[1:].tolist())
    clock, curve, images = Clock(), [], 0

    def measure(step: int) -> None:
        """Test accuracy now, the clock paused (the caller restarts it, unless training is over)."""
        clock.pause()
        curve.append({"seconds": clock.seconds, "step": step, "images": images,
                      "test_accuracy": evaluate_batches(learner, test_batches).accuracy})

    clock.start()
    for epoch in range(config.epochs):
        for step, x, y in training_batches(splits.train_images, splits.train_labels, config, epoch):
            global_step = epoch * steps_per_epoch + step
            learner.train_step(x, y, learning_rate(config.schedule, global_step, total_steps, config.lr))
            images += len(y)
            if global_step + 1 in measure_at and global_step + 1 < total_steps:
                measure(global_step + 1)
                clock.start()
        evaluate_batches(learner, evaluation_batches(splits.valid_images, splits.valid_labels, config,
                                                     rng=generator(config.seed, Stream.VALID, epoch)),
                         label_smoothing=config.label_smoothing)
    measure(total_steps)
    return {"contender": contender, "recipe": config.recipe, "seed": config.seed,
            "backend": learner.backend, "threads": threads, "train_seconds": clock.seconds,
            "compile_seconds": compile_seconds or kernel_seconds, "images": images,
            "final_test_accuracy": curve[-1]["test_accuracy"], "curve": curve,
            "time_to": {f"{100 * threshold:.1f}": time_to(curve, threshold) for threshold in THRESHOLDS}}


def time_to(curve: list[dict], threshold: float) -> float | None:
    """The clock at the first evaluation reaching ``threshold``, or None."""
    return next((point["seconds"] for point in curve if point["test_accuracy"] >= threshold), None)


def summarise(runs: list[dict]) -> dict:
    """Medians over seeds: seconds to each threshold (None unless every seed got there), training
    seconds; the mean final accuracy; the first seed's compile seconds (the later seeds' reuse what
    it compiled, in this process or in a disk cache, so their median would hide the compile)."""
    times = {}
    for key in runs[0]["time_to"]:
        reached = [run["time_to"][key] for run in runs]
        times[key] = statistics.median(reached) if all(t is not None for t in reached) else None
    return {"seeds": [run["seed"] for run in runs], "time_to": times,
            "train_seconds": statistics.median(run["train_seconds"] for run in runs),
            "final_test_accuracy": statistics.mean(run["final_test_accuracy"] for run in runs),
            "compile_seconds": runs[0]["compile_seconds"]}


def headline(table: dict, cores: int) -> tuple[str, float | None]:
    """"99.0% in N s on C CPU cores": numpylenet's fastest recipe, or None when none got there."""
    key = f"{100 * HEADLINE_THRESHOLD:.1f}"
    times = [rows["numpylenet"]["time_to"][key] for rows in table.values() if "numpylenet" in rows]
    best = min((t for t in times if t is not None), default=None)
    plural = "s" if cores > 1 else ""
    if best is None:
        return f"numpylenet did not reach {key}% here on {cores} CPU core{plural}", None
    return f"**{key}% in {best:.1f} s on {cores} CPU core{plural}**", best


def markdown(table: dict, line: str, evaluations: int) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.1f}"

    keys = [f"{100 * threshold:.1f}" for threshold in THRESHOLDS]
    rows = [[recipe, contender, ", ".join(map(str, row["seeds"])),
             *[seconds(row["time_to"][key]) for key in keys],
             f"{100 * row['final_test_accuracy']:.2f}", seconds(row["train_seconds"]),
             seconds(row["compile_seconds"])]
            for recipe, contenders in table.items() for contender, row in contenders.items()]
    body = common.markdown_table(
        ["recipe", "trainer", "seeds", *[f"s to {key}%" for key in keys], "final test accuracy (%)",
         "training s", "compile s (before the clock, first seed)"], rows, align="lll" + "r" * 6)
    note = (f"Seconds of training on the clock (batches, steps, per-epoch validation), medians over "
            f"seeds; the test set is measured {evaluations} times per run with the clock paused, so "
            f"a time is the first measurement at or above the threshold. \"-\": not reached by "
            f"every seed. Compile: the first seed's, with whatever disk caches the machine already "
            f"held (Numba's, inductor's); the later seeds reuse its graphs.")
    return f"{line}\n\n{body}\n\n{note}"


def plot(runs: list[dict]):
    from matplotlib.figure import Figure

    recipes = list(dict.fromkeys(run["recipe"] for run in runs))
    figure = Figure(figsize=(6 * len(recipes), 4.5), layout="constrained")
    colours = dict(zip(CONTENDERS, ("C0", "C3", "C1", "C2")))
    for axes, recipe in zip(np.atleast_1d(figure.subplots(1, len(recipes))), recipes):
        labelled = set()
        for run in (run for run in runs if run["recipe"] == recipe):
            seconds = [point["seconds"] for point in run["curve"]]
            accuracy = [100 * point["test_accuracy"] for point in run["curve"]]
            label = None if run["contender"] in labelled else run["contender"]
            labelled.add(run["contender"])
            axes.plot(seconds, accuracy, ".-", color=colours[run["contender"]], alpha=0.7, label=label)
        for threshold in THRESHOLDS:
            axes.axhline(100 * threshold, color="grey", lw=0.6, ls=":")
        axes.set(xlabel="training seconds (evaluation excluded)", ylabel="test accuracy (%)",
                 title=f"recipe {recipe}", ylim=(97.5, 99.8), xscale="log")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    figure.suptitle("Time to accuracy on MNIST: same recipe, batches and initial weights")
    return figure


def main(argv: list[str] | None = None) -> dict:
    from numpylenet.recipes import RECIPES

    parser = common.make_parser(NAME, __doc__.splitlines()[0], repeats=1)
    parser.add_argument("--recipes", nargs="+", default=["speedrun", "default"], choices=tuple(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--evaluations", type=positive_int, default=25,
                        help="test-set measurements per run, evenly spaced in steps (default 25)")
    parser.add_argument("--data-dir", default=None,
                        help="root holding MNIST/raw (default $NUMPYLENET_DATA, else ../shared/data)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.evaluations = args.seeds[:1], 3
        # torch.compile takes a minute to compile: too slow for a smoke test.
        args.contenders = [name for name in args.contenders if name != "torch.compile"]
        if not args.contenders:
            parser.error("--quick runs no torch.compile (it compiles for a minute): no contender left")
    common.set_threads(args.threads)         # before jax is imported: XLA reads its threads then
    if "jax" in args.contenders:
        from benchmarks.peers import jax_unavailable_reason
        if reason := jax_unavailable_reason():
            print(f"skipping jax: {reason}", flush=True)
            args.contenders.remove("jax")
            if not args.contenders:
                parser.error(f"jax cannot run here ({reason}): no contender left")

    from numpylenet.pipeline import load_splits, with_training_statistics
    from numpylenet.recipes import make_config

    runs = []
    for recipe in args.recipes:
        overrides = dict(dataset="mnist-sample", limit_train=320, epochs=1) if args.quick else \
            dict(dataset="mnist", data_dir=str(common.data_dir(args.data_dir)))
        splits = load_splits(make_config(recipe, download=False, threads=args.threads, **overrides))
        for seed in args.seeds:
            config = with_training_statistics(
                make_config(recipe, download=False, threads=args.threads, seed=seed, **overrides), splits)
            for contender in args.contenders:
                result = run(contender, config, splits, args.evaluations)
                print(f"{recipe} seed {seed} {contender}: {result['train_seconds']:.1f} s, final test "
                      f"accuracy {100 * result['final_test_accuracy']:.2f}%, time to "
                      f"{result['time_to']}", flush=True)
                runs.append(result)
    table: dict[str, dict[str, dict]] = {}
    for recipe in args.recipes:
        for contender in args.contenders:
            chosen = [run for run in runs if run["recipe"] == recipe and run["contender"] == contender]
            table.setdefault(recipe, {})[contender] = summarise(chosen)
    cores = min(args.threads, common.detect_machine(args.clock_ghz, args.flop_per_cycle).cores)
    line, best = headline(table, cores)
    content = {"dataset": "mnist-sample" if args.quick else "mnist", "recipes": args.recipes,
               "seeds": args.seeds, "contenders": args.contenders, "evaluations": args.evaluations,
               "thresholds": list(THRESHOLDS), "clock": "evaluation excluded (clock paused)",
               "headline": line, "headline_seconds": best, "table": table, "runs": runs,
               "markdown": markdown(table, line, args.evaluations)}
    # The torch learners leave Numba on one thread (reference.train runs its data kernel so): set
    # the run's threads again, so that the header reports what numpylenet and torch computed on
    # (each run's own threads are in its "threads").
    common.set_threads(args.threads)
    result = common.publish(args, NAME, content)
    common.save_figure(plot(runs), args.out, NAME)
    return result


if __name__ == "__main__":
    main()
