"""Inference throughput: forward passes only, numpylenet against torch eager, images per second.

    python -m benchmarks.inference [--batch-sizes 1 1000] [--threads 2] [--repeats 5] [--quick] [--out DIR]

For each batch size, times ``LeNet5.forward`` (numba and numpy backends) and the notebook's torch
LeNet under ``torch.no_grad()`` (as ``reference.train`` evaluates), all with the same float32
weights and inputs, round-robin in one process (median of ``--repeats``, see
:mod:`benchmarks.common`). Reports images/s, the speed relative to torch, and the share of the
machine's FP32 peak (a forward pass is 0.83 MFLOP per image). Writes ``inference.json``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import common

NAME = "inference"


def forward_functions(x: np.ndarray) -> dict[str, Callable[[], object]]:
    """Framework -> a function computing the logits of ``x`` (N, 1, 32, 32)."""
    import torch

    from numpylenet import LeNet5
    from numpylenet.backend import numba_unavailable_reason
    from reference.lenet import TorchLeNet5, copy_numpy_to_torch

    functions = {}
    torch_model = TorchLeNet5()
    copy_numpy_to_torch(LeNet5(seed=0, backend="numpy"), torch_model)
    images = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            return torch_model(images)

    functions["torch"] = torch_forward
    backends = ("numba", "numpy") if numba_unavailable_reason() is None else ("numpy",)
    for backend in backends:
        model = LeNet5(seed=0, backend=backend)
        functions[f"numpylenet ({backend})"] = lambda model=model: model.forward(x)
    return functions


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 1000],
                        help="batch sizes to time (default 1 1000)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batch_sizes = 1, [1, 100]
    common.set_threads(args.threads)
    machine = common.detect_machine(args.clock_ghz, args.flop_per_cycle)
    peak = machine.peak_gflops_for(args.threads) * 1e9
    flops = common.forward_flops_per_image()

    rng = np.random.default_rng(0)
    contenders, sizes = {}, {}
    for batch_size in args.batch_sizes:
        x = rng.random((batch_size, 1, 32, 32), dtype=np.float32)
        for framework, function in forward_functions(x).items():
            contenders[framework, batch_size] = function
            sizes[framework, batch_size] = batch_size
    timings = common.interleaved_timings(contenders, args.repeats,
                                         min_repeat_seconds=0.0 if args.quick else 0.2)

    rows = []
    for (framework, batch_size), timing in timings.items():
        images_per_second = batch_size / timing.median
        torch_seconds = timings["torch", batch_size].median
        rows.append({"framework": framework, "batch_size": batch_size,
                     "images_per_second": images_per_second,
                     "speed_vs_torch": torch_seconds / timing.median,
                     "share_of_peak": images_per_second * flops / peak, "timing": timing.to_json()})
    rows.sort(key=lambda row: (row["batch_size"], row["framework"] != "torch", row["framework"]))
    cores = min(args.threads, machine.cores)
    table = common.markdown_table(
        ["batch", "framework", "images/s", "speed vs torch", f"share of FP32 peak ({cores} core{'s' if cores > 1 else ''})"],
        [[f"{row['batch_size']:,}", row["framework"], f"{row['images_per_second']:,.0f}",
          f"{row['speed_vs_torch']:.2f}x", f"{100 * row['share_of_peak']:.1f}%"] for row in rows],
        align="rlrrr")
    meta = common.metadata(args)
    content = {"benchmark": NAME, "meta": meta, "dtype": "float32",
               "forward_flops_per_image": flops, "peak_flops_for_threads": peak,
               "batch_sizes": args.batch_sizes, "rows": rows, "markdown": table}
    path = common.write_json(args.out, NAME, content)
    print(f"{meta['machine_summary']}; threads {args.threads}\n\n{table}\n\nwrote {path}")
    return content


if __name__ == "__main__":
    main()
