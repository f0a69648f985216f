"""docs/tour.md and the notebook's source docs/tour.py stay true: their code references exist, the
tour's figures exist, its worked examples and its layer table are what the code computes.

* every `path.py: name` reference, in the tour and in the notebook, names a file of the repo that
  defines ``name`` (dotted for methods, ``Conv2d.backward``); modules are imported and the
  attribute looked up, except test files, which are parsed (importing them would collect their
  tests twice);
* the notebook's links are relative links to files that exist, each code reference linking its own
  file, and every section of the notebook links the code it runs;
* every `folder/file.ext` reference names an existing file;
* every image the tour links exists and is a PNG;
* the worked examples, each a ```text block after an ``<!-- worked-example: NAME -->`` marker, equal
  what im2col, Conv2d, col2im and split_train_valid return, and the independent truths next to them
  (the notebook's own shuffle, the adjoint identity);
* the parameter and FLOP table agrees with the shapes of a real LeNet5;
* the layer -> kernel table at the top of numpylenet/kernels.py names NumPy objects and kernels that
  exist, each NumPy layer's docstring names its kernels and each kernel's names its layers, and
  README's layout rows for the Numba modules name what is in them.
"""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from numpylenet import Conv2d, LeNet5, col2im, data, im2col

ROOT = Path(__file__).resolve().parents[1]
TOUR_PATH = ROOT / "docs" / "tour.md"
TOUR = TOUR_PATH.read_text(encoding="utf-8")
NOTEBOOK_SOURCE = (ROOT / "docs" / "tour.py").read_text(encoding="utf-8")
DOCUMENTS = {"docs/tour.md": TOUR, "docs/tour.py": NOTEBOOK_SOURCE}

CODE_REFERENCE = re.compile(r"`([\w./-]+\.py): ([A-Za-z_][\w.]*)`")
FILE_REFERENCE = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.(?:py|md|json|toml|txt|ipynb))`")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
WORKED_EXAMPLE = re.compile(r"<!-- worked-example: ([\w-]+) -->\s*```text\n(.*?)```", re.DOTALL)
MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def worked_example(name: str) -> np.ndarray:
    """The integer matrix written in the tour's worked example ``name``."""
    blocks = dict(WORKED_EXAMPLE.findall(TOUR))
    assert name in blocks, f"docs/tour.md has no worked example {name!r}"
    return np.array([[int(value) for value in line.split()] for line in blocks[name].strip().splitlines()])


def defined_in_source(path: Path, dotted: str) -> bool:
    """Whether the Python file defines ``dotted`` (a top-level name, or Class.member) without importing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scope = tree.body
    for part in dotted.split("."):
        found = None
        for node in scope:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     else [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                           if isinstance(t, ast.Name)])
            if part in names:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def code_references(text: str | None = None):
    """The (path, name) references of one document, or of all of them."""
    texts = [text] if text is not None else DOCUMENTS.values()
    return sorted({reference for text in texts for reference in CODE_REFERENCE.findall(text)})


def test_the_tour_names_code():
    assert len(code_references(TOUR)) >= 30, "the reference pattern no longer matches the tour's references"


def test_the_tour_s_kernel_table_names_kernels_that_exist():
    """The tour's layer -> kernel table names kernels without a path (the reference check above
    does not see them): each Numba column name must be a function of numpylenet/kernels.py."""
    pytest.importorskip("numba")
    from numpylenet import kernels

    header = "| layer | NumPy | Numba forward | Numba backward |"
    rows = TOUR.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]   # after |---|
    names = [name for row in rows for cell in row.strip("|").split("|")[2:] for name in re.findall(r"`(\w+)`", cell)]
    assert len(names) >= 9, rows
    assert [name for name in names if not callable(getattr(kernels, name, None))] == []


def notebook_markdown() -> list[str]:
    """The notebook's Markdown cells (its source's ``# %% [markdown]`` cells, comment marks removed)."""
    parts = re.split(r"^(# %%.*)$", NOTEBOOK_SOURCE, flags=re.MULTILINE)[1:]   # marker, body, marker, ...
    return [re.sub(r"^# ?", "", body, flags=re.MULTILINE) for marker, body in zip(parts[::2], parts[1::2])
            if marker.endswith("[markdown]")]


def test_every_notebook_section_links_the_code_it_runs():
    sections = [cell for cell in notebook_markdown() if cell.lstrip().startswith("## ")]
    assert len(sections) >= 9
    for section in sections:
        assert CODE_REFERENCE.search(section), f"the notebook's section {section.split(chr(10))[0]!r} links no code"


@pytest.mark.parametrize("text, target", sorted({link for cell in notebook_markdown()
                                                 for link in MARKDOWN_LINK.findall(cell)}))
def test_notebook_link_resolves(text, target):
    """A relative link from docs/ to a file that exists; a code reference links its own file."""
    assert "://" not in target, f"the notebook links {target}: keep links relative, so they work in a clone"
    assert (ROOT / "docs" / target.split("#")[0]).resolve().is_file(), f"the notebook links {target}, which does not exist"
    reference = CODE_REFERENCE.fullmatch(text)
    if reference:
        assert (ROOT / "docs" / target).resolve() == (ROOT / reference[1]).resolve(), f"{text} links {target}"


def load_module(path: str):
    """Import the module at ``path``: by its dotted name inside a package, else straight from the file."""
    file = ROOT / path
    if (file.parent / "__init__.py").is_file():
        return importlib.import_module(path[:-len(".py")].replace("/", "."))
    name = f"tour_{file.stem}"
    if name not in sys.modules:   # registered first, as dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, file)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize("path, name", code_references(), ids=lambda value: value)
def test_code_reference_exists(path, name):
    file = ROOT / path
    assert file.is_file(), f"the docs name {path}, which does not exist"
    if path.startswith("tests/"):
        assert defined_in_source(file, name), f"the docs name {path}: {name}, which is not defined there"
        return
    if path.startswith(("reference/", "docs/")):
        pytest.importorskip("torch")
    target = load_module(path)
    for part in name.split("."):
        assert hasattr(target, part), f"the docs name {path}: {name}, but {part!r} is not there"
        target = getattr(target, part)


@pytest.mark.parametrize("path", sorted({path for text in DOCUMENTS.values() for path in FILE_REFERENCE.findall(text)}))
def test_file_reference_exists(path):
    assert (ROOT / path).is_file(), f"the docs name {path}, which does not exist"


@pytest.mark.parametrize("link", sorted(set(IMAGE_LINK.findall(TOUR))))
def test_figure_exists(link):
    figure = TOUR_PATH.parent / link
    assert figure.is_file(), f"docs/tour.md shows {link}; run python docs/make_figures.py"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{link} is not a PNG"


# The worked example: a 1x4x4 input, a 2x2 kernel, stride 1, no padding.

def worked_input() -> np.ndarray:
    return worked_example("input").astype(np.float64).reshape(1, 1, 4, 4)


def test_worked_input_is_one_to_sixteen():
    assert np.array_equal(worked_example("input"), np.arange(1, 17).reshape(4, 4))


def test_worked_cols_are_im2col():
    assert np.array_equal(im2col(worked_input(), (2, 2)), worked_example("cols"))


def test_worked_output_is_the_convolution():
    assert "W = [[1, 2], [3, 4]]" in TOUR
    conv = Conv2d(1, 1, 2, dtype=np.float64)
    conv.weight.data[...] = [[1, 2], [3, 4]]
    conv.bias.data[...] = 0
    output = worked_example("output")
    assert np.array_equal(conv.forward(worked_input())[0, 0], output)
    # The same numbers by the definition: the dot product of the kernel with each 2x2 window.
    x = worked_input()[0, 0]
    by_definition = [[np.sum(x[i:i + 2, j:j + 2] * [[1, 2], [3, 4]]) for j in range(3)] for i in range(3)]
    assert np.array_equal(by_definition, output)


def test_worked_col2im_counts_windows():
    assert np.array_equal(col2im(np.ones((4, 9)), (1, 1, 4, 4), (2, 2))[0, 0], worked_example("col2im-ones"))


def test_col2im_is_the_adjoint_of_im2col_on_the_worked_example():
    grads = np.random.default_rng(0).standard_normal((4, 9))
    x = worked_input()
    assert np.isclose(np.sum(im2col(x, (2, 2)) * grads), np.sum(x * col2im(grads, x.shape, (2, 2))), rtol=1e-14)


def test_split_head_is_the_notebooks_shuffle():
    quoted = worked_example("split-valid-head")[0]
    saved = np.random.get_state()
    try:   # the notebook's split_train_valid_data, verbatim in effect
        np.random.seed(0)
        indices = list(range(60000))
        np.random.shuffle(indices)
    finally:
        np.random.set_state(saved)
    assert np.array_equal(quoted, indices[:len(quoted)])
    assert np.array_equal(quoted, data.split_train_valid(60000, 0.1, seed=0)[1][:len(quoted)])


# The parameter and FLOP table of section 3.

def layer_table() -> dict[str, list[str]]:
    """Rows of the table after ``<!-- table: layers -->``: first cell -> all cells."""
    block = TOUR.split("<!-- table: layers -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {row[0]: row for row in rows}


def count(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_layer_table_matches_lenet5():
    model = LeNet5(seed=0)
    table = layer_table()
    outputs, x = {}, np.zeros((1, 1, 32, 32), np.float32)
    for layer in model.layers:
        x = layer.forward(x)
        outputs[layer] = x.shape[1:]
    total_flops = 0
    for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        layer = getattr(model, name)
        _, shape, _, parameters, flops = table[name]
        assert tuple(int(size) for size in shape.split(" x ")) == outputs[layer], name
        assert count(parameters) == layer.weight.data.size + layer.bias.data.size, name
        fan_in = layer.weight.data[0].size                 # multiply-adds per output value
        assert count(flops) == 2 * int(np.prod(outputs[layer])) * fan_in, name
        total_flops += count(flops)
    assert count(table["total"][3]) == model.num_parameters() == 61706
    assert count(table["total"][4]) == total_flops


def test_training_step_flops_are_three_forward_passes_less_conv1_input_gradient():
    """Section 3's count, against the one the speed benchmarks divide by."""
    from benchmarks.common import forward_flops_per_image, training_flops_per_image

    table = layer_table()
    forward, conv1 = count(table["total"][4]), count(table["conv1"][4])
    assert forward == forward_flops_per_image()
    assert 3 * forward - conv1 == training_flops_per_image()
    assert f"{3 * forward / 1e6:.2f} MFLOP" in TOUR and f"{(3 * forward - conv1) / 1e6:.2f} MFLOP" in TOUR


# The layer -> kernel table at the top of numpylenet/kernels.py, and the links both ways.

KERNELS_PATH = ROOT / "numpylenet" / "kernels.py"
TICKED = re.compile(r"`([A-Za-z_][\w.]*)`")


def kernel_table() -> list[list[str]]:
    """Rows of the table after ``<!-- table: kernels -->`` in the kernels module's docstring (read
    from the source, so without importing Numba): cells layer, NumPy, Numba, layout, fused."""
    docstring = ast.get_docstring(ast.parse(KERNELS_PATH.read_text(encoding="utf-8")))
    block = docstring.split("<!-- table: kernels -->", 1)[1].strip().split("\n\n", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def kernels_module():
    """numpylenet.kernels, or None where Numba cannot run (then names are checked in the source)."""
    from numpylenet.backend import numba_unavailable_reason

    if numba_unavailable_reason() is not None:
        return None
    return importlib.import_module("numpylenet.kernels")


def numpy_object(dotted: str):
    """``layers.Conv2d`` -> numpylenet.layers.Conv2d (a name of the table's NumPy column)."""
    target = importlib.import_module("numpylenet")
    for part in dotted.split("."):
        target = getattr(target, part) if hasattr(target, part) else importlib.import_module(
            f"{target.__name__}.{part}")
    return target


def test_kernel_table_has_a_row_per_layer():
    layers_named = {row[0] for row in kernel_table()}
    assert {"conv1", "conv2", "conv3", "fc1", "fc2", "flatten", "loss", "network", "Adam", "SGD"} <= layers_named


@pytest.mark.parametrize("row", kernel_table(), ids=lambda row: row[0])
def test_kernel_table_names_exist(row):
    for name in TICKED.findall(row[1]):
        numpy_object(name)
    kernels = kernels_module()
    for name in TICKED.findall(row[2]):
        if kernels is None:
            assert defined_in_source(KERNELS_PATH, name), f"kernels.py defines no {name}"
        else:
            assert hasattr(kernels, name), f"kernels.py has no {name}"


def class_docstrings(cls) -> str:
    """The docstrings of a class and of its bases inside numpylenet; of a function, its own."""
    if not isinstance(cls, type):
        return cls.__doc__ or ""
    return "\n".join(klass.__doc__ or "" for klass in cls.__mro__ if klass.__module__.startswith("numpylenet"))


@pytest.mark.parametrize("row", [row for row in kernel_table() if TICKED.findall(row[2])], ids=lambda row: row[0])
def test_kernel_table_links_both_ways(row):
    """Each NumPy class (or function) of a row names the row's kernels, and each kernel names the
    NumPy classes (or functions)."""
    kernel_names = TICKED.findall(row[2])
    classes = set()
    for name in TICKED.findall(row[1]):
        target, owner = numpy_object(name), numpy_object(name.rpartition(".")[0])
        classes.add(owner if isinstance(owner, type) else target)      # a method's class, else itself
    for cls in classes:
        missing = [kernel for kernel in kernel_names if kernel not in class_docstrings(cls)]
        assert not missing, f"{cls.__name__}'s docstring does not name its Numba kernels {missing}"
    kernels = kernels_module()
    for kernel in kernel_names:
        doc = (getattr(kernels, kernel).__doc__ if kernels is not None else
               next(ast.get_docstring(node) for node in ast.parse(KERNELS_PATH.read_text()).body
                    if getattr(node, "name", None) == kernel))
        missing = [cls.__name__ for cls in classes if cls.__name__ not in doc]
        assert not missing, f"kernels.{kernel}'s docstring does not name the layers it mirrors {missing}"


def readme_layout_row(path: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return next(line for line in readme.splitlines() if line.startswith(f"| `{path}` |"))


@pytest.mark.parametrize("path", ["numpylenet/kernels.py", "numpylenet/engine.py"])
def test_readme_layout_names_of_the_numba_modules_exist(path):
    names = [name for name in TICKED.findall(readme_layout_row(path).split("|")[2]) if "." not in name]
    assert names, f"README's layout row for {path} names nothing"
    if path.endswith("kernels.py") and kernels_module() is None:
        for name in names:
            assert defined_in_source(ROOT / path, name), f"README names {path}: {name}, not there"
        return
    if path.endswith("engine.py") and kernels_module() is None:
        pytest.skip("the engine needs Numba")
    module = load_module(path)
    for name in names:
        assert hasattr(module, name), f"README names {path}: {name}, which is not there"
