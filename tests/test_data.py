"""Recipe data: CURVES generation and caching, IDX reading (files written by the test)."""
import gzip
import struct

import numpy as np
import pytest

from recipes.data import generate_curves, load_curves, load_mnist, read_idx


def test_curves_are_deterministic_images_in_unit_range():
    a, b = generate_curves(50, seed=3), generate_curves(50, seed=3)
    assert a.shape == (50, 784) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.array_equal(a, generate_curves(50, seed=4))
    ink = (a > 0.5).sum(1)
    assert (ink > 5).all() and (ink < 300).all()  # a stroke, not an empty or filled image


def test_curves_prefix_does_not_depend_on_the_total():
    assert np.array_equal(generate_curves(10, seed=0), generate_curves(40, seed=0)[:10])


def test_curves_are_cached_on_disk(tmp_path):
    train, test = load_curves(tmp_path, n_train=30, n_test=10)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and train.shape == (30, 784) and test.shape == (10, 784)
    again_train, _ = load_curves(tmp_path, n_train=30, n_test=10)
    assert np.array_equal(train, again_train)


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_are_read_and_scaled(tmp_path, gz):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(6, 28, 28))
    test = rng.integers(0, 256, size=(3, 28, 28))
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test, gz)
    x_train, x_test = load_mnist(tmp_path)
    assert x_train.shape == (6, 784) and x_test.shape == (3, 784)
    assert np.allclose(x_train, train.reshape(6, -1) / 255.0)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), test.astype(np.uint8))


def test_missing_or_bad_idx_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_mnist(tmp_path)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
