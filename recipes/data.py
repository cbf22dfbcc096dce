"""Datasets of the autoencoder recipes: CURVES (generated) and MNIST (IDX files).

CURVES
------
Hinton & Salakhutdinov (2006) describe CURVES as 28×28 images of curves drawn through
three randomly chosen points, with real-valued pixel intensities in [0, 1]; 20,000
training and 10,000 test images. The original files are not redistributable here, so
:func:`generate_curves` makes a faithful synthetic equivalent, deterministically from
a seed:

1. three control points uniformly in the 28×28 square (kept 2 pixels from the border),
   ordered so that the two farthest apart are the ends of the curve;
2. the quadratic curve through them, c(s) = Lagrange interpolation with the points at
   s = 0, m, 1 (it passes through all three; m is the chord-length fraction of the middle
   point, clipped to [0.1, 0.9], which avoids hairpin folds), sampled at 64 values of s;
3. a soft stroke: pixel intensity = max over samples of exp(−d²/(2σ²)), d the distance
   from the pixel centre to the sample and σ = 0.75 pixel, so pixels on the curve are
   ~1 and the intensity falls to ~0 within two pixels.

Where it may differ from the original files: the original used a different
(unpublished) curve family and anti-aliasing, so stroke width, curvature range and
the intensity profile differ; error figures are comparable in kind and scale, not
digit for digit. The data are cached as ``.npz`` under ``cache_dir`` after the first
generation (a few seconds).

MNIST
-----
:func:`load_mnist` reads the standard IDX files (``train-images-idx3-ubyte`` etc.,
gzipped or not) from a directory, scaling pixels to [0, 1]; with ``download=True`` and
torchvision installed it lets torchvision fetch them first.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["generate_curves", "load_curves", "read_idx", "load_mnist", "default_cache_dir"]

_SIDE = 28


def default_cache_dir() -> Path:
    """``$TORCH_HF_DATA`` or ``~/.cache/torch_hf``."""
    return Path(os.environ.get("TORCH_HF_DATA", Path.home() / ".cache" / "torch_hf"))


def generate_curves(n: int, seed: int = 0, sigma: float = 0.75, samples: int = 64, chunk: int = 1000) -> np.ndarray:
    """``n`` CURVES-like images, float32 of shape (n, 784) in [0, 1] (see the module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    points = rng.uniform(2.0, _SIDE - 2.0, size=(n, 3, 2))
    # The two points farthest apart are the ends, so the curve does not fold back on itself.
    pair_d = np.stack([np.linalg.norm(points[:, a] - points[:, b], axis=1) for a, b in ((1, 2), (0, 2), (0, 1))], 1)
    middle = pair_d.argmax(1)  # the point not in the farthest pair
    order = np.array([[1, 0, 2], [0, 1, 2], [0, 2, 1]])[middle]
    points = np.take_along_axis(points, order[:, :, None], axis=1)
    # Chord-length parameterisation of the middle node avoids hairpin folds.
    d1 = np.linalg.norm(points[:, 1] - points[:, 0], axis=1)
    d2 = np.linalg.norm(points[:, 2] - points[:, 1], axis=1)
    mid = (d1 / np.maximum(d1 + d2, 1e-9)).clip(0.1, 0.9)[:, None]  # (n, 1)
    s = np.linspace(0.0, 1.0, samples)[None, :]  # (1, samples)
    # Lagrange basis for nodes 0, mid, 1 (the curve passes through all three points)
    basis = np.stack([(s - mid) * (s - 1.0) / mid, s * (s - 1.0) / (mid * (mid - 1.0)), s * (s - mid) / (1.0 - mid)],
                     axis=-1)  # (n, samples, 3)
    curve = np.einsum("nsk,nkd->nsd", basis, points).astype(np.float32)  # (n, samples, 2)
    grid = np.arange(_SIDE, dtype=np.float32) + 0.5
    centres = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)  # (784, 2): (row, col)
    c2 = (centres**2).sum(-1)
    out = np.empty((n, _SIDE * _SIDE), dtype=np.float32)
    for start in range(0, n, chunk):
        cv = curve[start : start + chunk]
        # ‖pixel − sample‖² by expansion: one matrix product per chunk
        d2 = (cv**2).sum(-1)[:, :, None] + c2[None, None, :] - 2.0 * cv @ centres.T  # (m, samples, 784)
        out[start : start + chunk] = np.exp(-np.maximum(d2.min(1), 0.0) / (2 * sigma**2))
    return out
    return out


def load_curves(cache_dir: str | os.PathLike | None = None, n_train: int = 20000, n_test: int = 10000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CURVES train and test sets (float32, (n, 784)), generated once and cached."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"curves_seed{seed}_{n_train}_{n_test}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["train"], data["test"]
    images = generate_curves(n_train + n_test, seed=seed)
    train, test = images[:n_train], images[n_train:]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, train=train, test=test)
    os.replace(tmp, path)
    return train, test


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not, told by its first bytes) into a numpy array."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for candidate in (directory / name, directory / "MNIST" / "raw" / name):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory} (pass --data-dir with the MNIST IDX files, "
                            "or --download with torchvision installed)")


def load_mnist(data_dir: str | os.PathLike, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST train (60,000) and test (10,000) images as float32 (n, 784) in [0, 1]."""
    directory = Path(data_dir)
    if download:
        try:
            import torchvision  # noqa: F401
            from torchvision.datasets import MNIST
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("--download needs torchvision; install it or pass --data-dir with IDX files") from exc
        for train in (True, False):
            MNIST(str(directory), train=train, download=True)
    train = read_idx(_find(directory, "train-images-idx3-ubyte"))
    test = read_idx(_find(directory, "t10k-images-idx3-ubyte"))
    return (train.reshape(len(train), -1).astype(np.float32) / 255.0,
            test.reshape(len(test), -1).astype(np.float32) / 255.0)
