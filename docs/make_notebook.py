"""Regenerate docs/tour.ipynb, run and with its outputs, from its source docs/tour.py.

``docs/tour.py`` is the notebook's one source of truth, in jupytext's percent format: ``# %%``
starts a code cell, ``# %% [markdown]`` a Markdown cell whose lines are ``# ``-comments. It is what
gets reviewed and diffed. This script reads it, runs it top to bottom in a fresh Python kernel
(from docs/, as ``jupyter lab docs/tour.ipynb`` would) and writes ``docs/tour.ipynb`` with every
output, so that GitHub shows the results without anyone running it::

    python docs/make_notebook.py      # needs the dev extra: nbformat, nbclient, ipykernel

Outputs are deterministic (seeded, nothing timed), so rerunning it on an unchanged source changes
nothing but what the machine's libraries draw differently. ``tests/test_notebook.py`` runs the
source the same way and checks that the committed notebook's cells are the source's cells.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parent
SOURCE = DOCS / "tour.py"
NOTEBOOK = DOCS / "tour.ipynb"
CELL_MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?\s*$")


def read_cells(text: str) -> list[tuple[str, str]]:
    """The cells of a percent-format script, as (``"code"`` or ``"markdown"``, source) pairs.

    Blank lines around a cell are dropped; a Markdown line loses its leading ``# `` (``#`` alone is
    an empty line).
    """
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        marker = CELL_MARKER.match(line)
        if marker:
            cells.append(("markdown" if marker["markdown"] else "code", []))
            continue
        if not cells:
            if line.strip():
                raise ValueError(f"line {number}: text before the first '# %%' cell marker")
            continue
        kind, lines = cells[-1]
        if kind == "markdown":
            if line not in ("", "#") and not line.startswith("# "):
                raise ValueError(f"line {number}: a Markdown cell's lines start with '# ', got {line!r}")
            line = line[2:]
        lines.append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of ``cells``, without outputs, for a Python 3 kernel."""
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    for index, (kind, source) in enumerate(cells):
        make_cell = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        # Stable ids (nbformat would draw random ones): the file changes only where its cells do.
        notebook.cells.append(make_cell(source, id=f"cell-{index:02d}"))
    return notebook


def execute(notebook: nbformat.NotebookNode, *, timeout: float = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in docs/; raises CellExecutionError if one fails."""
    # Without MPLBACKEND (CI sets Agg) the kernel draws inline, so the figures become outputs.
    env = {name: value for name, value in os.environ.items() if name != "MPLBACKEND"}
    # One BLAS thread: the notebook's matrices are small, and on a busy machine a second OpenBLAS
    # thread mostly waits for the first (the training section measured 3x slower with two, under
    # load; the same on an idle machine). The outputs do not depend on it.
    env["OPENBLAS_NUM_THREADS"] = "1"
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(DOCS)}})
    client.execute(env=env)
    return notebook


def main() -> None:
    started = time.perf_counter()
    notebook = execute(build_notebook(read_cells(SOURCE.read_text(encoding="utf-8"))))
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(DOCS.parent)} ({len(notebook.cells)} cells, "
          f"{NOTEBOOK.stat().st_size / 1024:.0f} KB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
