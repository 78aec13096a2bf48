"""Datasets and batching: IDX files written here byte by byte (every type code, gzip'd or
not, every corruption), .npz files, digits, the stratified split, seeded batches, DataLoader."""

import gzip
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn import data
from gpunn.data import DataLoader, Dataset, batches, read_idx, stratified_split

# IDX type code -> (big-endian struct letter, NumPy dtype it reads back as)
CODES = {0x08: ("B", np.uint8), 0x09: ("b", np.int8), 0x0B: ("h", np.int16),
         0x0C: ("i", np.int32), 0x0D: ("f", np.float32), 0x0E: ("d", np.float64)}


def idx_bytes(values: np.ndarray, code: int) -> bytes:
    """The IDX encoding, built with struct (independent of the reader's NumPy dtypes)."""
    letter = CODES[code][0]
    flat = values.ravel().tolist()
    return (bytes([0, 0, code, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
            + struct.pack(f">{len(flat)}{letter}", *flat))


def write(path, payload: bytes, gz: bool = False):
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return path


def sample(rng, code, shape):
    dtype = CODES[code][1]
    if np.dtype(dtype).kind == "f":
        a = rng.standard_normal(shape).astype(dtype) * 1e3
        if a.size >= 3:
            a.flat[:3] = [np.inf, -np.inf, np.finfo(dtype).tiny]
        return a
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if a.size >= 2:
        a.flat[:2] = [info.min, info.max]
    return a


# ---------------------------------------------------------------------------------------------
# IDX

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(0,), (1,), (13,), (3, 5, 7), (2, 3), (2, 1, 3, 4)])
@pytest.mark.parametrize("code", sorted(CODES))
def test_read_idx_round_trip(tmp_path, rng, code, shape, gz):
    values = sample(rng, code, shape)
    path = write(tmp_path / ("f.gz" if gz else "f"), idx_bytes(values, code), gz)
    out = read_idx(path)
    assert out.dtype == CODES[code][1] and out.dtype.isnative
    assert out.shape == shape
    assert out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, values)


def test_read_idx_content_decides_gzip(tmp_path, rng):
    """A raw IDX file named .gz, and a gzip'd one without the suffix, both read."""
    values = sample(rng, 0x08, (4, 3))
    raw = idx_bytes(values, 0x08)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "raw.gz", raw)), values)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "packed", raw, gz=True)), values)


def test_read_idx_nan_float(tmp_path):
    values = np.array([np.nan, 1.5, -0.0], np.float32)
    out = read_idx(write(tmp_path / "f", idx_bytes(values, 0x0D)))
    np.testing.assert_array_equal(out, values)
    assert np.signbit(out[2])


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)
CORRUPT = {
    "empty": (b"", "empty file"),
    "short magic": (b"\x00\x00", "magic"),
    "bad magic": (b"\x01" + GOOD[1:], "two zero bytes"),
    "bad magic 2": (b"\x00\x07" + GOOD[2:], "two zero bytes"),
    "unknown type": (GOOD[:2] + b"\x0a" + GOOD[3:], "unknown IDX type code 0x0A"),
    "truncated header": (GOOD[:9], "truncated header"),
    "truncated data": (GOOD[:-1], "truncated data"),
    "no data": (GOOD[:16], "truncated data"),
    "trailing bytes": (GOOD + b"\x00\x00", "2 trailing bytes"),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_read_idx_corrupt(tmp_path, case, gz):
    payload, message = CORRUPT[case]
    path = write(tmp_path / "bad-file", payload, gz)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "bad-file" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad crc", "magic only"])
def test_read_idx_corrupt_gzip(tmp_path, damage):
    packed = gzip.compress(GOOD)
    payload = {
        "truncated": packed[:len(packed) // 2],
        "garbage": packed[:10] + b"\xff" * 20 + packed[30:],
        "bad crc": packed[:-8] + bytes([packed[-8] ^ 1]) + packed[-7:],
        "magic only": packed[:2],
    }[damage]
    path = write(tmp_path / "bad.gz", payload)
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert "bad.gz" in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing")


def mnist_files(folder, rng, n, shape=(5, 4), classes=10, split="train", prefix="",
                gz=False, dotted=False):
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    labels = rng.integers(0, classes, n, dtype=np.uint8)
    stem = "train" if split == "train" else "t10k"
    names = [f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte"]
    if dotted:
        names = [name.replace("-idx", ".idx") for name in names]
    suffix = ".gz" if gz else ""
    write(folder / (prefix + names[0] + suffix), idx_bytes(images, 0x08), gz)
    write(folder / (prefix + names[1] + suffix), idx_bytes(labels, 0x08), gz)
    return images, labels


def test_load_idx(tmp_path, rng):
    images, labels = mnist_files(tmp_path, rng, 11)
    ds = data.load_idx(tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte")
    assert ds.x.shape == (11, 1, 5, 4) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x[:, 0], images.astype(np.float32) / np.float32(255))
    assert ds.x.min() >= 0 and ds.x.max() <= 1
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.y.dtype == np.int64
    assert ds.num_classes == max(int(labels.max()) + 1, 2)
    assert ds.name == tmp_path.name
    named = data.load_idx(tmp_path / "train-images-idx3-ubyte",
                          tmp_path / "train-labels-idx1-ubyte", name="m", num_classes=12)
    assert named.name == "m" and named.num_classes == 12


def test_load_idx_checks(tmp_path, rng):
    write(tmp_path / "img", idx_bytes(rng.integers(0, 256, (4, 2, 2), dtype=np.uint8), 0x08))
    write(tmp_path / "lab3", idx_bytes(np.zeros(3, np.uint8), 0x08))
    write(tmp_path / "labf", idx_bytes(np.zeros(4, np.float32), 0x0D))
    write(tmp_path / "lab2d", idx_bytes(np.zeros((4, 1), np.uint8), 0x08))
    write(tmp_path / "labneg", idx_bytes(np.array([0, 1, -1, 2], np.int8), 0x09))
    write(tmp_path / "img1d", idx_bytes(np.zeros(4, np.uint8), 0x08))
    for labels, message in [("lab3", "4 samples but labels .* hold 3"),
                            ("labf", "integer labels"), ("lab2d", "1-D"),
                            ("labneg", "non-negative")]:
        with pytest.raises(ValueError, match=message):
            data.load_idx(tmp_path / "img", tmp_path / labels)
    with pytest.raises(ValueError, match="sample axis"):
        data.load_idx(tmp_path / "img1d", tmp_path / "lab3")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39: inf as float32
@pytest.mark.parametrize("source", ["idx float32", "idx float64", "npz", "idx folder"])
def test_non_finite_samples_refused_alike(tmp_path, rng, source, bad):
    images = rng.standard_normal((4, 2, 3))
    images[2, 1, 0] = bad
    labels = np.array([0, 1, 1, 0], np.uint8)
    if source == "npz":
        np.savez(tmp_path / "d.npz", x=images, y=labels)
        call, where = (lambda: data.load_npz(tmp_path / "d.npz")), "d.npz"
    else:
        code = 0x0D if source == "idx float32" and abs(bad) != 1e39 else 0x0E
        write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images, code))
        write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels, 0x08))
        if source == "idx folder":
            call = lambda: data.load(str(tmp_path))
        else:
            call = lambda: data.load_idx(tmp_path / "train-images-idx3-ubyte",
                                         tmp_path / "train-labels-idx1-ubyte")
        where = "train-images-idx3-ubyte"
    with pytest.raises(ValueError, match=r"holds NaN or infinite values \(as float32\)") as info:
        call()
    assert where in str(info.value)


def test_load_idx_other_types_not_scaled(tmp_path, rng):
    images = rng.standard_normal((3, 2, 2)).astype(np.float64)
    write(tmp_path / "img", idx_bytes(images, 0x0E))
    write(tmp_path / "lab", idx_bytes(np.array([0, 1, 1], np.int32), 0x0C))
    ds = data.load_idx(tmp_path / "img", tmp_path / "lab")
    np.testing.assert_array_equal(ds.x[:, 0], images.astype(np.float32))


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (False, True)])
def test_load_folder(tmp_path, rng, gz, dotted):
    folder = tmp_path / "mymnist"
    folder.mkdir()
    images, labels = mnist_files(folder, rng, 9, classes=3, gz=gz, dotted=dotted)
    train, test = data.load(str(folder))
    assert test is None
    assert train.name == "mymnist"
    np.testing.assert_array_equal(train.y, labels)
    np.testing.assert_array_equal(train.x[:, 0] * np.float32(255), images.astype(np.float32))
    # with a test split: num_classes covers labels seen only in the test split
    test_images, test_labels = mnist_files(folder, rng, 6, classes=3, split="test", gz=gz,
                                           dotted=dotted)
    test_labels[0] = 7
    mnist_files_labels = idx_bytes(test_labels, 0x08)
    name = "t10k-labels.idx1-ubyte" if dotted else "t10k-labels-idx1-ubyte"
    write(folder / (name + (".gz" if gz else "")), mnist_files_labels, gz)
    train, test = data.load(folder)  # a PathLike works too
    assert test.name == "mymnist:test" and len(test) == 6
    assert train.num_classes == test.num_classes == 8
    np.testing.assert_array_equal(test.y, test_labels)
    np.testing.assert_array_equal(test.x[:, 0] * np.float32(255), test_images.astype(np.float32))


def test_load_prefix(tmp_path, rng):
    images, labels = mnist_files(tmp_path, rng, 5, prefix="fashion-")
    train, test = data.load(str(tmp_path / "fashion-"))
    assert test is None and train.name == "fashion"
    np.testing.assert_array_equal(train.y, labels)


def test_load_not_found(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="a folder.*train-images-idx3-ubyte"):
        data.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        data.load(str(tmp_path / "nothing" / "here"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(str(tmp_path / "missing.npz"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="notes.txt"):
        data.load(str(tmp_path / "notes.txt"))
    # a test split with only one of its two files
    mnist_files(tmp_path, rng, 4)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((2, 5, 4), np.uint8), 0x08))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load(str(tmp_path))
    with pytest.raises(TypeError, match="spec"):
        data.load(3)


def test_load_test_shape_mismatch(tmp_path, rng):
    mnist_files(tmp_path, rng, 4, shape=(5, 4))
    mnist_files(tmp_path, rng, 4, shape=(4, 5), split="test")
    with pytest.raises(ValueError, match="sample shape"):
        data.load(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# .npz

def test_load_npz(tmp_path, rng):
    x2 = rng.standard_normal((6, 5))
    y = np.array([0, 2, 1, 2, 0, 1], np.int32)
    np.savez(tmp_path / "tab.npz", x=x2, y=y)
    ds = data.load_npz(tmp_path / "tab.npz")
    assert ds.x.shape == (6, 5) and ds.x.dtype == np.float32 and ds.name == "tab"
    np.testing.assert_array_equal(ds.x, x2.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)
    assert ds.num_classes == 3
    x3 = rng.integers(0, 256, (6, 3, 4), dtype=np.uint8)
    np.savez_compressed(tmp_path / "img.npz", x=x3, y=y, extra=np.zeros(2))
    train, test = data.load(str(tmp_path / "img.npz"))
    assert test is None and train.x.shape == (6, 1, 3, 4)
    np.testing.assert_array_equal(train.x[:, 0], x3.astype(np.float32))  # cast, not scaled
    x4 = rng.standard_normal((6, 3, 2, 2))
    np.savez(tmp_path / "img4.npz", x=x4, y=np.zeros(6, np.uint8))
    ds = data.load_npz(tmp_path / "img4.npz", name="four")
    assert ds.x.shape == (6, 3, 2, 2) and ds.num_classes == 2 and ds.name == "four"


def test_load_npz_errors(tmp_path, rng):
    x = rng.standard_normal((4, 3))
    cases = {
        "nox": (dict(y=np.zeros(4, np.int64)), r"lacks the array\(s\) \['x'\]"),
        "noy": (dict(x=x), r"\['y'\]"),
        "floaty": (dict(x=x, y=np.zeros(4)), "integer labels"),
        "negy": (dict(x=x, y=np.array([0, -1, 1, 0])), "non-negative"),
        "len": (dict(x=x, y=np.zeros(3, np.int64)), "4 samples but 'y' holds 3"),
        "y2d": (dict(x=x, y=np.zeros((4, 1), np.int64)), "1-D"),
        "x1d": (dict(x=np.zeros(4), y=np.zeros(4, np.int64)), "sample axis"),
        "nan": (dict(x=np.where(x > 0, np.nan, x), y=np.zeros(4, np.int64)), "NaN"),
        "strx": (dict(x=np.array([["a"]] * 4), y=np.zeros(4, np.int64)), "numbers"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=message) as info:
            data.load_npz(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(info.value)


@pytest.mark.parametrize("compressed", [False, True])
def test_load_npz_corrupt(tmp_path, rng, compressed):
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "good.npz", x=rng.standard_normal((50, 8)), y=np.arange(50) % 3)
    raw = (tmp_path / "good.npz").read_bytes()
    damaged = {
        "cut-half": raw[:len(raw) // 2],
        "cut-tail": raw[:-30],
        "cut-head": raw[:40],
        "flipped": raw[:200] + bytes(b ^ 0x5A for b in raw[200:400]) + raw[400:],
        "text": b"this is not an archive at all",
        "empty": b"",
    }
    for name, payload in damaged.items():
        (tmp_path / f"{name}.npz").write_bytes(payload)
        with pytest.raises(ValueError) as info:
            data.load_npz(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(info.value), name
        if name in ("text", "empty"):
            assert "no zip signature" in str(info.value)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    os.replace(tmp_path / "plain.npy", tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="plain.npz' is not an .npz archive"):
        data.load_npz(tmp_path / "plain.npz")
    with pytest.raises(FileNotFoundError):
        data.load_npz(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------
# digits, Dataset

def test_digits():
    from sklearn import datasets

    ds = data.load_digits()
    reference = datasets.load_digits()
    assert ds.name == "digits" and len(ds) == 1797 and ds.num_classes == 10
    assert ds.x.shape == (1797, 1, 8, 8) and ds.sample_shape == (1, 8, 8)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    np.testing.assert_array_equal(ds.x.reshape(1797, 64) * 16, reference.data)
    counts = np.bincount(ds.y, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 170 and counts.max() <= 185
    np.testing.assert_array_equal(ds.y, reference.target)
    train, test = data.load("digits")
    assert test is None and len(train) == 1797


def test_dataset_validation():
    x, y = np.zeros((3, 2), np.float32), np.array([0, 1, 1])
    ds = Dataset(x.astype(np.float64), y.astype(np.uint8), 2, "d")
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 3
    assert ds.sample_shape == (2,) and "samples=3" in repr(ds)
    cases = [
        (dict(x=[[0.0]] * 3), "Dataset.x"),
        (dict(x=np.zeros(())), "Dataset.x"),
        (dict(x=np.array([["a", "b"]] * 3)), "Dataset.x must hold real numbers"),
        (dict(y=np.zeros((3, 1), np.int64)), "Dataset.y must be a 1-D"),
        (dict(y=np.zeros(3)), "Dataset.y must hold integer labels"),
        (dict(y=np.array([0, 1])), "Dataset.x has 3 samples but Dataset.y has 2"),
        (dict(y=np.array([0, 2, 1])), r"Dataset.y must lie in \[0, num_classes=2\)"),
        (dict(y=np.array([0, -1, 1])), "Dataset.y must lie"),
        (dict(num_classes=0), "Dataset.num_classes"),
        (dict(num_classes=2.0), "Dataset.num_classes"),
        (dict(num_classes=True), "Dataset.num_classes"),
        (dict(name=3), "Dataset.name"),
    ]
    for change, message in cases:
        fields = dict(x=x, y=y, num_classes=2, name="d") | change
        with pytest.raises(ValueError, match=message):
            Dataset(**fields)
    with pytest.raises(AttributeError):
        ds.num_classes = 3  # frozen


# ---------------------------------------------------------------------------------------------
# stratified split

def indexed_dataset(labels):
    """x[i] = i, so every sample can be traced back to its index."""
    n = len(labels)
    return Dataset(np.arange(n, dtype=np.float32)[:, None], np.asarray(labels),
                   int(np.max(labels)) + 1, "idx")


@pytest.mark.parametrize("seed", [0, 1, 17])
def test_stratified_split(seed):
    ds = data.load_digits()
    train, test = stratified_split(ds, 0.25, seed=seed)
    assert len(train) + len(test) == len(ds)
    assert train.num_classes == test.num_classes == 10
    assert (train.name, test.name) == ("digits:train", "digits:test")
    total, in_test = np.bincount(ds.y), np.bincount(test.y, minlength=10)
    assert np.all(np.abs(in_test - 0.25 * total) <= 1), (in_test, total)
    np.testing.assert_array_equal(np.bincount(train.y, minlength=10) + in_test, total)
    # every sample lands on exactly one side, with its own label
    ids = indexed_dataset(ds.y)
    tr, te = stratified_split(ids, 0.25, seed=seed)
    seen = np.concatenate([tr.x[:, 0], te.x[:, 0]]).astype(np.int64)
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(ds)))
    np.testing.assert_array_equal(ds.y[tr.x[:, 0].astype(np.int64)], tr.y)
    np.testing.assert_array_equal(ds.y[te.x[:, 0].astype(np.int64)], te.y)
    # deterministic per seed, different across seeds
    again = stratified_split(ids, 0.25, seed=seed)[1]
    np.testing.assert_array_equal(again.x, te.x)
    other = stratified_split(ids, 0.25, seed=seed + 1)[1]
    assert not np.array_equal(np.sort(other.x[:, 0]), np.sort(te.x[:, 0]))


@given(counts=st.lists(st.integers(2, 40), min_size=2, max_size=6),
       fraction=st.sampled_from([0.2, 0.25, 0.3, 0.5]), seed=st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_stratified_split_proportions(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    n_test = int(np.ceil(fraction * len(labels)))
    if n_test < len(counts) or len(labels) - n_test < len(counts):
        return  # too small for a stratified split (scikit-learn refuses)
    _, test = stratified_split(indexed_dataset(labels), fraction, seed)
    in_test = np.bincount(test.y, minlength=len(counts))
    # scikit-learn takes ceil(fraction * n) test samples and shares them out class by class:
    # each class's count is within one of its share of that total
    share = n_test * np.asarray(counts) / len(labels)
    assert in_test.sum() == n_test
    assert np.all(np.abs(in_test - share) < 1), (in_test, counts)


def test_stratified_split_errors():
    ds = indexed_dataset(np.array([0, 0, 1, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        stratified_split(ds)
    ok = indexed_dataset(np.array([0, 0, 1, 1, 0, 1, 0, 1]))
    for bad in (0, 1, 1.5, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="test_fraction"):
            stratified_split(ok, bad)
    with pytest.raises(ValueError, match="seed"):
        stratified_split(ok, 0.5, seed=-1)
    with pytest.raises(TypeError, match="Dataset"):
        stratified_split((ok.x, ok.y))


# ---------------------------------------------------------------------------------------------
# batches, DataLoader

@given(n=st.integers(0, 300), batch_size=st.integers(1, 70), seed=st.integers(0, 2**40),
       epoch=st.integers(0, 1000), drop_last=st.booleans(), shuffle=st.booleans())
@settings(max_examples=60, deadline=None)
def test_batches_cover_once(n, batch_size, seed, epoch, drop_last, shuffle):
    parts = list(batches(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                         drop_last=drop_last))
    assert all(p.dtype == np.int64 for p in parts)
    full, rest = divmod(n, batch_size)
    assert [len(p) for p in parts] == [batch_size] * full + ([rest] if rest and not drop_last
                                                              else [])
    seen = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if drop_last:
        assert len(np.unique(seen)) == len(seen) == full * batch_size
        assert np.all((seen >= 0) & (seen < n))
    else:
        np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    if not shuffle:
        np.testing.assert_array_equal(seen, np.arange(len(seen)))
    again = list(batches(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                         drop_last=drop_last))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again)) and len(parts) == len(again)


def test_batches_differ_between_epochs_and_seeds():
    def order(seed, epoch):
        return np.concatenate(list(batches(1000, 64, shuffle=True, seed=seed, epoch=epoch)))

    base = order(3, 5)
    assert not np.array_equal(base, order(3, 6))
    assert not np.array_equal(base, order(4, 5))
    np.testing.assert_array_equal(base, order(3, 5))
    np.testing.assert_array_equal(base, data.order(1000, shuffle=True, seed=3, epoch=5))
    # the documented recipe, so that a resumed run can rely on it
    np.testing.assert_array_equal(base, np.random.default_rng((3, 5)).permutation(1000))


def test_batches_errors():
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="batch_size"):
            batches(10, bad, shuffle=True)
    with pytest.raises(ValueError, match="seed"):
        batches(10, 2, shuffle=True, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        batches(10, 2, shuffle=True, epoch=-1)
    with pytest.raises(ValueError, match="n must"):
        batches(-1, 2, shuffle=True)


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_data_loader(rng, reuse, drop_last):
    n = 103
    labels = rng.integers(0, 5, n)
    x = rng.standard_normal((n, 2, 3)).astype(np.float32)
    x[:, 0, 0] = np.arange(n)  # the sample's index, to check the pairing
    ds = Dataset(x, labels, 5, "t")
    loader = DataLoader(ds, 16, seed=7, drop_last=drop_last, reuse_buffers=reuse)
    assert len(loader) == (6 if drop_last else 7)
    for e in (0, 1):
        expected = list(batches(n, 16, shuffle=True, seed=7, epoch=e, drop_last=drop_last))
        got = [(bx.copy(), by.copy()) for bx, by in loader.epoch(e)]
        assert len(got) == len(loader) == len(expected)
        for (bx, by), idx in zip(got, expected):
            assert bx.dtype == np.float32 and by.dtype == np.int64
            np.testing.assert_array_equal(bx, x[idx])
            np.testing.assert_array_equal(by, labels[idx])
    plain = DataLoader(ds, 50, shuffle=False)
    parts = list(plain.epoch(0))
    assert [len(by) for _, by in parts] == [50, 50, 3]
    np.testing.assert_array_equal(np.concatenate([bx for bx, _ in parts]), x)
    assert all(bx.flags.c_contiguous for bx, _ in parts)


def test_data_loader_fresh_batches_are_kept():
    ds = indexed_dataset(np.arange(10) % 2)
    kept = list(DataLoader(ds, 3, shuffle=False).epoch(0))
    np.testing.assert_array_equal(np.concatenate([bx[:, 0] for bx, _ in kept]), np.arange(10))


def test_data_loader_errors():
    ds = indexed_dataset(np.arange(10) % 2)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, 0)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(ds, 2, seed=-3)
    with pytest.raises(ValueError, match="xp"):
        DataLoader(ds, 2, xp=os)
    with pytest.raises(TypeError, match="Dataset"):
        DataLoader((ds.x, ds.y), 2)
    with pytest.raises(ValueError, match="epoch"):
        DataLoader(ds, 2).epoch(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("reuse", [False, True])
def test_data_loader_cupy(rng, reuse):
    import cupy

    n = 77
    labels = rng.integers(0, 4, n)
    x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
    ds = Dataset(x, labels, 4, "g")
    loader = DataLoader(ds, 10, seed=2, xp=cupy, reuse_buffers=reuse)
    assert isinstance(loader.x, cupy.ndarray)
    expected = list(batches(n, 10, shuffle=True, seed=2, epoch=3))
    got = [(cupy.asnumpy(bx), cupy.asnumpy(by)) for bx, by in loader.epoch(3)]
    assert len(got) == len(expected) == len(loader)
    for (bx, by), idx in zip(got, expected):
        assert bx.dtype == np.float32 and by.dtype == np.int64
        np.testing.assert_array_equal(bx, x[idx])
        np.testing.assert_array_equal(by, labels[idx])
