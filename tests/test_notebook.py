"""docs/tour.ipynb: it runs top to bottom in a fresh kernel, with torch and without, and the committed
notebook is its source, docs/tour.py, with the outputs of a clean run.

The notebook's code references are kept true by tests/test_docs.py, with the tour's.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from helpers import BLOCK_TORCH

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def load_make_notebook():
    """docs/make_notebook.py, imported from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "docs" / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_notebook = load_make_notebook()


def source_cells() -> list[tuple[str, str]]:
    return make_notebook.read_cells(make_notebook.SOURCE.read_text(encoding="utf-8"))


def text_outputs(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def check_ran_cleanly(notebook) -> None:
    """Every code cell ran, in order, with no error and nothing on stderr."""
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    for cell in code:
        kinds = {output.output_type for output in cell.outputs}
        streams = {output.name for output in cell.outputs if output.output_type == "stream"}
        assert "error" not in kinds and "stderr" not in streams, f"cell {cell.id}: {text_outputs(cell)}"


def test_committed_notebook_is_its_source():
    committed = nbformat.read(make_notebook.NOTEBOOK, as_version=4)
    assert [(cell.cell_type, cell.source) for cell in committed.cells] == source_cells(), (
        "docs/tour.ipynb differs from docs/tour.py: run python docs/make_notebook.py")


def test_committed_notebook_shows_a_clean_run():
    """Run, figures included, and nothing that names the machine it ran on."""
    committed = nbformat.read(make_notebook.NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    check_ran_cleanly(committed)
    assert images(committed) >= 5
    text = json.dumps([cell.get("outputs", []) for cell in committed.cells])
    assert "/work/" not in text and "/home/" not in text and str(ROOT) not in text


def run_section_outputs(notebook) -> dict[str, str]:
    """Each code cell's printed text, keyed by the heading of the section it is in."""
    outputs, section = {}, "intro"
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            section = cell.source.splitlines()[0][3:]
        elif cell.cell_type == "code":
            outputs[section] = outputs.get(section, "") + text_outputs(cell)
    return outputs


def test_notebook_runs_top_to_bottom():
    notebook = make_notebook.execute(make_notebook.build_notebook(source_cells()))
    check_ran_cleanly(notebook)
    assert images(notebook) >= 5
    printed = run_section_outputs(notebook)
    # The hand-made finite differences agree with backward: every printed difference is round-off.
    backward = printed["5. The backward pass, checked by finite differences"]
    differences = [float(value) for value in re.findall(r"(?<!finite )difference (\S+)", backward)]
    assert len(differences) == 5 and max(differences) < 1e-8
    # 300 steps on the sample learn something real (96% here; chance is 10%).
    accuracy = float(re.search(r"validation accuracy ([\d.]+)%", printed["8. A short training run"])[1])
    assert accuracy > 90
    if HAVE_TORCH:
        errors = [float(line.split()[-1]) for line in printed["6. The same numbers from torch"].splitlines()[1:]]
        assert len(errors) == 12 and max(errors) < 1e-12


def test_notebook_without_torch_skips_the_torch_cells():
    """Run up to the end of the torch section (the rest would only repeat the run above) with torch
    made unimportable; the cells after it must not touch torch at all."""
    cells = source_cells()
    end = next(index for index, (kind, source) in enumerate(cells) if source.startswith("## 7."))
    assert not any("torch" in source for kind, source in cells[end:] if kind == "code")
    notebook = make_notebook.build_notebook(cells[:end])
    notebook.cells.insert(0, nbformat.v4.new_code_cell(BLOCK_TORCH, id="block-torch"))
    make_notebook.execute(notebook)
    check_ran_cleanly(notebook)
    printed = run_section_outputs(notebook)
    assert "torch is not installed" in printed["intro"]
    assert printed["6. The same numbers from torch"].strip() == (
        'skipped: this cell needs torch (pip install -e ".[reference]")')
