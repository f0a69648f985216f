"""The package's shape: imports run one way, the core needs no Numba, each fact has one source.

* The import graph of ``numpylenet`` - every ``import`` and ``from ... import`` of a module of the
  package, at module level and inside functions alike, read with ``ast`` (those under
  ``if TYPE_CHECKING:`` never run and are left out) - has no cycle: layers, loss, kernels ->
  the Numba engine -> model, optim -> loop -> the command-line tools.
* ``numpylenet.layers``, ``.loss``, ``.optim`` and ``.model`` import, and a NumPy-backend model
  trains, where Numba cannot be imported (a meta-path hook blocks it, in a fresh interpreter).
* Every table keyed by activation, pooling, dtype or backend names covers exactly the names of
  :mod:`numpylenet.names`; the kernels and the engine write no LeNet-5 size as a literal.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numpylenet import layers, model, names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "numpylenet"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return skipped


def imported_modules(name: str, path: Path) -> set[str]:
    """The modules of the package that module ``name`` imports, anywhere in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped, found = type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:        # numpylenet.x.function -> numpylenet.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def cycle_through(start: str) -> list[str] | None:
    """An import cycle through ``start`` (start, ..., start), or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in sorted(GRAPH[node]):
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_the_graph_sees_imports_at_module_level_and_inside_functions():
    assert "numpylenet.layers" in GRAPH["numpylenet.model"]          # module level
    assert "numpylenet.engine" in GRAPH["numpylenet.model"]          # inside LeNet5.__init__
    assert "numpylenet.kernels" in GRAPH["numpylenet.engine"]
    assert len(MODULES) >= 20


@pytest.mark.parametrize("module", list(MODULES))
def test_module_is_on_no_import_cycle(module):
    cycle = cycle_through(module)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_one_way():
    """What the issue orders: the layers and the kernels never import the engine, model,
    optimisers or training loop; the engine never imports model or optimisers."""
    below = {"numpylenet.layers", "numpylenet.loss", "numpylenet.kernels", "numpylenet.blas", "numpylenet.names",
             "numpylenet.numba_cache"}
    above = {"numpylenet.engine", "numpylenet.model", "numpylenet.optim", "numpylenet.loop", "numpylenet.train",
             "numpylenet.evaluate", "numpylenet"}
    for name in below:
        assert not GRAPH[name] & above, f"{name} imports {sorted(GRAPH[name] & above)}"
    assert not GRAPH["numpylenet.engine"] & {"numpylenet.model", "numpylenet.optim", "numpylenet.loop"}


BLOCK_NUMBA = """
import sys

class BlockNumba:
    '''A meta-path finder that makes numba (and llvmlite) look uninstalled.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockNumba())
"""


def run_without_numba(program: str) -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_NUMBA + program], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["layers", "loss", "optim", "model", "backend", "names"])
def test_core_module_imports_without_numba(module):
    run_without_numba(f"import numpylenet.{module}\n"
                      "assert not any(m.split('.')[0] in ('numba', 'llvmlite') for m in sys.modules)\n")


def test_numpy_backend_trains_and_sets_threads_without_numba():
    run_without_numba(
        "import numpy as np, numpylenet\n"
        "from numpylenet.backend import numba_unavailable_reason, resolve_backend, set_threads\n"
        "assert 'blocked by the test' in numba_unavailable_reason()\n"
        "model = numpylenet.LeNet5(seed=0)\n"
        "assert model.backend == 'numpy' and resolve_backend() == 'numpy'\n"
        "assert set_threads(1) == 1\n"
        "optimizer = numpylenet.Adam(model.parameters())\n"
        "assert optimizer.fused_buffers is None\n"
        "x = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)\n"
        "model.backward(numpylenet.softmax_cross_entropy(model(x), np.array([1, 2]))[1])\n"
        "optimizer.step()\n"
        "try:\n"
        "    numpylenet.LeNet5(backend='numba')\n"
        "except ValueError as error:\n"
        "    assert 'numba backend is unavailable' in str(error)\n"
        "else:\n"
        "    raise AssertionError('a numba model was built without numba')\n")


# --------------------------------------------------------------------------------------------
# One source for each fact
# --------------------------------------------------------------------------------------------

def tables() -> list:
    """(description, keys, names) for every table keyed by names.* names."""
    found = [("model.ACTIVATIONS", model.ACTIVATIONS, names.ACTIVATION_NAMES),
             ("model.POOLS", model.POOLS, names.POOL_NAMES),
             ("layers.FLOAT_DTYPES", [dtype.name for dtype in layers.FLOAT_DTYPES], names.DTYPE_NAMES)]
    from numpylenet.backend import numba_unavailable_reason
    if numba_unavailable_reason() is None:
        from numpylenet import kernels
        found += [("kernels.ACTIVATION_CODES", kernels.ACTIVATION_CODES, names.ACTIVATION_NAMES),
                  ("kernels.POOL_CODES", kernels.POOL_CODES, names.POOL_NAMES)]
    try:
        from reference import lenet, train
    except ImportError:          # torch is an optional extra
        return found
    return found + [("reference.lenet.ACTIVATIONS", lenet.ACTIVATIONS, names.ACTIVATION_NAMES),
                    ("reference.lenet.POOLS", lenet.POOLS, names.POOL_NAMES),
                    ("reference.train.TORCH_DTYPES", train.TORCH_DTYPES, names.DTYPE_NAMES)]


def test_every_named_table_covers_exactly_the_names():
    for description, table, expected in tables():
        assert sorted(table) == sorted(expected), f"{description} has {sorted(table)}, names.py {expected}"


def test_every_name_builds_a_model():
    for activation in names.ACTIVATION_NAMES:
        for pool in names.POOL_NAMES:
            for dtype in names.DTYPE_NAMES:
                net = model.LeNet5(activation=activation, pool=pool, dtype=dtype, backend="numpy")
                assert net.forward(np.zeros((1, 1, 32, 32))).dtype == dtype


# The sizes of LeNet-5 that the kernels must derive from PARAMETER_SHAPES rather than write out.
LENET_SIZES = {5, 6, 10, 14, 16, 25, 28, 32, 84, 100, 120, 150, 400}


@pytest.mark.parametrize("path", ["numpylenet/kernels.py", "numpylenet/engine.py"])
def test_no_lenet_size_is_written_as_a_literal(path):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    allowed = set()
    for node in ast.walk(tree):       # the one place the sizes are written
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAMETER_SHAPES" for t in node.targets):
            allowed |= {id(inner) for inner in ast.walk(node)}
    literals = [(node.lineno, node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and type(node.value) is int and node.value in LENET_SIZES
                and id(node) not in allowed]
    assert not literals, f"{path} writes LeNet-5 sizes as literals (line, value): {literals}"
