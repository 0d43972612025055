"""Fuzzed config values and data files: whatever a user writes, the config loader and the readers
either accept it or raise the one-line errors the CLI prints (ValueError, FileNotFoundError),
never a TypeError, KeyError or a crash from inside numpy, yaml or PIL."""

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfsup.config import apply_overrides, load_recipe, resolve
from selfsup.data import formats

CLEAR = (ValueError, FileNotFoundError)
RECIPE = load_recipe("simclr/fashion_mnist")
KEYS = [f"{section}.{key}" for section, values in RECIPE.items() for key in values] + [
    "train.epochs", "train.budget_minutes", "optim.warmup_epochs", "eval.knn_k",
    "optim.clip", "train.label_fraction", "method.nonsense", "nonsense.key",
]  # fmt: skip
YAML_VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "[]", "{}", "[1, 2]", "{a: 1}", "'x'", "- a", "["]),
    st.sampled_from(["!!binary x", "!!python/object:os.system", "1e400", "-0", "0x10"]),
    st.text(max_size=12),
)  # fmt: skip
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), YAML_VALUES), min_size=1, max_size=3))
def test_any_override_resolves_or_gives_a_clear_error(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    with contextlib.suppress(*CLEAR):
        resolve(apply_overrides(RECIPE, overrides))


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_as_an_idx_file_read_or_give_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("idx") / "images-idx3-ubyte"
    path.write_bytes(data)
    with contextlib.suppress(*CLEAR):
        formats.read_idx(path)


@FUZZ
@given(
    st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_]),
    st.lists(st.integers(1, 5), min_size=1, max_size=5),
    st.floats(-300, 300),
    st.booleans(),
)
def test_any_npz_array_reads_or_gives_a_clear_error(tmp_path_factory, dtype, shape, scale, labels):
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    images = (np.random.default_rng(0).random(shape) * scale).astype(dtype)
    arrays = {"images": images}
    if labels:
        arrays["labels"] = np.arange(shape[0]) - 1
    np.savez(path, **arrays)
    try:
        read, _ = formats.read_npz(path)
    except CLEAR:
        return
    assert read.dtype == np.uint8 and read.ndim == 4


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_an_image_file_are_skipped_or_give_a_clear_error(
    tmp_path_factory, suffix, data
):
    folder = tmp_path_factory.mktemp("images")
    (folder / f"x{suffix}").write_bytes(data)
    with contextlib.suppress(*CLEAR):
        formats.read_image_folder(folder)
