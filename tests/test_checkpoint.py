"""Checkpoint reading trusts nothing: every field of every part, mutated, is refused as corrupt or read
as a valid value - never a crash later on (issue 15, finding 12) - and JSON outputs are standard.

The properties are checked against the JSON types of a real run's checkpoint: a field whose value
changes JSON type (a string for a number, a float for an integer, null where none may be), a number
that turns negative or non-finite must be refused; anything at all must be refused or accepted,
never raise anything but CheckpointError.
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from cli_runs import TINY, saved
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numpylenet.checkpoint import CheckpointError, Progress, check_parts, load_checkpoint
from numpylenet.files import json_text
from numpylenet.recipes import TrainConfig
from numpylenet.train import main as train_main

# Fields that may be null in a valid checkpoint (besides fields a newer numpylenet may add).
NULLABLE = {"config": {"backend", "threads", "limit_train"}, "progress": {"best_valid_loss"},
            "history": {"train_images_per_second"}}
# History fields the tools read and so validate; others are informational.
HISTORY_CHECKED = {"epoch", "train_loss", "valid_loss", "valid_accuracy", "train_images_per_second",
                   "train_loss_trace"}

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)
# What a careless edit or a damaged file puts in a field (the list among them), and anything.
VALUES = st.sampled_from(["3", "x", "", "abc", None, True, False, 1.5, 2.5, -3, 0, 10**9, 10**400,
                          [1, 2, 3], [], {}, math.nan, math.inf, -math.inf]) | JSON_VALUES
MODEL = {"conv1.bias": np.zeros(6, np.float32)}
OPTIMIZER = {"step": np.array(3, np.int64), "exp_avg.1": np.zeros(6, np.float32)}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """The JSON parts of a real run's last.npz, plus small stand-in arrays for the rest."""
    folder = tmp_path_factory.mktemp("checkpoint") / "run"
    with redirect_stderr(StringIO()), redirect_stdout(StringIO()):
        assert train_main([*TINY, "--out", str(folder)]) == 0
    return {name: saved(folder / "last.npz", name) for name in ("config", "progress", "history")}


def write(path: Path, config, progress, history, model=None, optimizer=None,
          version=np.array(1, np.int64)) -> Path:
    entries = {"format_version": version, "framework": np.array("numpylenet"),
               "config": np.array(json.dumps(config)), "progress": np.array(json.dumps(progress)),
               "history": np.array(json.dumps(history))}
    for name, value in (MODEL if model is None else model).items():
        entries[f"model/{name}"] = value
    for name, value in (OPTIMIZER if optimizer is None else optimizer).items():
        entries[f"optimizer/{name}"] = value
    np.savez(path, **entries)
    return path


def kind(value) -> str:
    """The JSON type of a value: null, bool, int, float, string, list, object."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "bool", False: "bool"}[value]
    return {int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def must_refuse(part: str, name: str, original, value) -> bool:
    """Whether replacing ``original`` by ``value`` must make the checkpoint corrupt."""
    if part == "history" and name not in HISTORY_CHECKED:
        return False
    expected, got = kind(original), kind(value)
    if got == "null":
        return name not in NULLABLE[part]
    if expected == "null":   # a nullable field holding null in the run: its type is not known here
        return False
    if expected == "float" and got == "int":
        return False
    if got != expected:
        return True
    if got == "float" and not math.isfinite(value):
        return True
    return got in ("int", "float") and value < 0   # every number a run saves is >= 0


def test_the_real_checkpoint_loads(parts, tmp_path):
    checkpoint = load_checkpoint(write(tmp_path / "c.npz", **parts))
    assert checkpoint.config == parts["config"] and checkpoint.progress == parts["progress"]


@pytest.mark.parametrize("version", [np.array(0, np.int64), np.array(-1, np.int64), np.array(2, np.int64),
                                     np.array(1.0), np.array([1], np.int64)], ids=["0", "-1", "2", "1.0", "[1]"])
def test_only_format_version_1_is_read(parts, tmp_path, version):
    """A newer (or older, never written) format is refused by name, not read as if it were 1."""
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(write(tmp_path / "c.npz", **parts, version=version))


# Every field of a two-epoch run's checkpoint: the config, the progress and both history records.
HISTORY_KEYS = ("epoch", "train_loss", "valid_loss", "valid_accuracy", "lr_end", "seconds",
                "train_images_per_second", "train_loss_trace")
FIELDS = ([("config", None, f.name) for f in dataclasses.fields(TrainConfig)]
          + [("progress", None, f.name) for f in dataclasses.fields(Progress)]
          + [("history", index, name) for index in (0, 1) for name in HISTORY_KEYS])


def test_every_field_is_mutated(parts):
    real = ([("config", None, name) for name in parts["config"]]
            + [("progress", None, name) for name in parts["progress"]]
            + [("history", index, name) for index, record in enumerate(parts["history"]) for name in record])
    assert sorted(real, key=str) == sorted(FIELDS, key=str), "the parametrisation below is stale"


def best_loss_not_the_best_epoch_s(content):
    content["history"][content["progress"]["best_epoch"] - 1]["valid_loss"] += 1.0


def fewer_images_than_steps(content):
    content["progress"].update(step=2, step_losses=[1.0, 1.0], epoch_images=1)


def step_losses_not_one_a_step(content):
    content["progress"].update(step=2, step_losses=[1.0], epoch_images=64)


def images_before_the_first_step(content):
    content["progress"].update(step=0, step_losses=[], epoch_images=5)


@pytest.mark.parametrize("edit, message", [
    (best_loss_not_the_best_epoch_s, "best validation loss"), (fewer_images_than_steps, "inconsistent"),
    (step_losses_not_one_a_step, "inconsistent"), (images_before_the_first_step, "inconsistent")])
def test_parts_that_contradict_each_other_are_refused(parts, edit, message):
    """Each field valid on its own, together impossible (a hand edit, a mix of two runs)."""
    content = json.loads(json.dumps(parts))
    assert content["progress"]["best_epoch"] >= 1
    check_parts(content, MODEL, OPTIMIZER)          # the real parts pass
    edit(content)
    with pytest.raises(ValueError, match=message):
        check_parts(content, MODEL, OPTIMIZER)


@pytest.mark.parametrize("part, index, name", FIELDS, ids=[f"{p}{'' if i is None else i}.{n}" for p, i, n in FIELDS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_a_mutated_field_is_refused_or_valid(parts, part, index, name, value):
    """check_parts, the one validator, on the real parts with one field replaced by ``value``."""
    content = json.loads(json.dumps(parts))
    target = content[part] if index is None else content[part][index]
    original, target[name] = target[name], value
    try:
        check_parts(content, MODEL, OPTIMIZER)
    except ValueError:
        return
    assert not must_refuse(part, name, original, value), f"{part}.{name} = {value!r} was accepted"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=VALUES)
def test_a_mutated_checkpoint_file_is_corrupt_in_one_line_or_loads(parts, tmp_path, data, value):
    part, index, name = data.draw(st.sampled_from(FIELDS))
    content = json.loads(json.dumps(parts))
    (content[part] if index is None else content[part][index])[name] = value
    path = write(tmp_path / "c.npz", **content)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    assert checkpoint.history == content["history"] or part == "history"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_removed_or_added_field_is_refused_where_it_matters(parts, tmp_path, data):
    part = data.draw(st.sampled_from(["config", "progress"]))
    content = json.loads(json.dumps(parts))
    if data.draw(st.booleans()):
        # Settings added after the first release have defaults: a checkpoint without them is an
        # older one, not a corrupt one (test_old_checkpoint_without_the_newer_settings_loads).
        removable = sorted(set(content[part]) - (NEWER_SETTINGS if part == "config" else set()))
        del content[part][data.draw(st.sampled_from(removable))]
    else:
        content[part][data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in content[part]))] = 1
    with pytest.raises(CheckpointError):
        load_checkpoint(write(tmp_path / "c.npz", **content))


NEWER_SETTINGS = {f.name for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def test_old_checkpoint_without_the_newer_settings_loads(parts, tmp_path):
    content = json.loads(json.dumps(parts))
    for name in NEWER_SETTINGS:
        del content["config"][name]
    assert NEWER_SETTINGS <= {"label_smoothing", "nesterov", "normalize_mean", "normalize_std"} | {
        f"affine_{name}" for name in ("degrees", "translate", "scale", "shear")}
    checkpoint = load_checkpoint(write(tmp_path / "old.npz", **content))
    assert not NEWER_SETTINGS & checkpoint.config.keys()


@pytest.mark.parametrize("model, optimizer", [
    ({"conv1.bias": np.zeros(6, np.float16)}, None),
    ({"conv1.bias": np.zeros(6, np.uint64)}, None),
    ({"conv1.bias": np.zeros(6, np.complex64)}, None),
    ({"conv1.bias": np.array([0, np.inf], np.float32)}, None),
    ({}, None),
    (None, {"step": np.zeros(2, np.int64)}),
    (None, {"step": np.array(-1)}),
    (None, {"step": np.array(1.5)}),
    (None, {"step": np.array(1), "exp_avg.0": np.array([np.nan])}),
], ids=["float16", "uint64", "complex", "inf", "no weights", "step (2,)", "step -1", "step 1.5",
        "nan state"])
def test_weights_and_optimizer_state_of_the_wrong_kind_are_refused(parts, tmp_path, model, optimizer):
    path = write(tmp_path / "c.npz", **parts, model=model, optimizer=optimizer)
    if model == {}:
        entries = dict(np.load(path))
        np.savez(path, **{k: v for k, v in entries.items() if not k.startswith("model/")})
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_evaluating_needs_only_the_weights(parts, tmp_path):
    """Without the training state, history and optimizer are not read, so their faults do not matter."""
    content = json.loads(json.dumps(parts))
    content["history"] = "not a list"
    path = write(tmp_path / "c.npz", **content, optimizer={"step": np.zeros(2)})
    assert load_checkpoint(path, training_state=False).history == []
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
NESTED = st.recursive(st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=5),
                      lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=10)


def finite_only(value):
    """The expected reading: the structure with NaN and infinities as None (computed independently)."""
    if isinstance(value, float) and (value != value or value in (math.inf, -math.inf)):
        return None
    if isinstance(value, list):
        return [finite_only(item) for item in value]
    if isinstance(value, dict):
        return {key: finite_only(item) for key, item in value.items()}
    return value


@settings(max_examples=200, deadline=None)
@given(content=NESTED)
def test_json_text_is_standard_json_with_null_for_non_finite_numbers(content):
    def refuse(token):
        raise ValueError(f"non-standard token {token}")

    assert json.loads(json_text(content), parse_constant=refuse) == finite_only(content)
    assert json.loads(json_text(np.float32(np.nan))) is None and json.loads(json_text(np.int64(3))) == 3
