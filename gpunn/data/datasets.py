"""Datasets: an in-memory (x, y) pair and the readers that build one.

Sources
    digits  scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes), no download.
    IDX     the MNIST file format (also Fashion-MNIST, KMNIST, EMNIST): a 4-byte magic
            ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 dimensions, then the
            big-endian data; read as is or gzip-compressed.
    .npz    arrays ``x`` (N, ...) and ``y`` (N,) of integer labels.

Readers bound their work by what the file declares: an IDX header's shape must match the
file's size (raw) or be at most :data:`~gpunn.checkpoint.DEFLATE_MAX_RATIO` times it (gzip,
deflate's limit), and the data is inflated as it is read, never beyond the declared size plus
a little to spot trailing bytes; .npz members are read as in :mod:`gpunn.checkpoint` (sizes
checked against the zip directory first, deflated or stored, never unpickled). Float samples
holding NaN or infinity (as float32) are refused, from any source.

Samples are float32 with a leading sample axis; images are (N, C, H, W) (a 3-D image file
(N, H, W) gets C = 1), feature tables stay (N, F). Labels are int64 in [0, num_classes).
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..checkpoint import DEFLATE_MAX_RATIO, READ_CHUNK, read_npy_member

#: IDX type code -> big-endian element dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
#: trailing bytes counted in an error message (beyond: "more than")
_TRAILING_COUNTED = 1 << 16


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples ``x`` (float32, (N, *sample_shape)) with labels ``y`` (int64, (N,)) in
    ``[0, num_classes)``. Arrays are converted on construction (x to float32; y to int64
    when it holds integers) and checked: a bad field is a ValueError naming it."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = "dataset"

    def __post_init__(self):
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or x.ndim < 1:
            raise ValueError(f"Dataset.x must be a NumPy array with a leading sample axis; got "
                             f"{type(x).__name__} of shape {getattr(x, 'shape', None)}")
        if x.dtype.kind not in "biuf":
            raise ValueError(f"Dataset.x must hold real numbers; got dtype {x.dtype}")
        if not isinstance(y, np.ndarray) or y.ndim != 1:
            raise ValueError(f"Dataset.y must be a 1-D NumPy array of labels; got "
                             f"{type(y).__name__} of shape {getattr(y, 'shape', None)}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"Dataset.y must hold integer labels; got dtype {y.dtype}")
        if len(x) != len(y):
            raise ValueError(f"Dataset.x has {len(x)} samples but Dataset.y has {len(y)} labels")
        k = self.num_classes
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"Dataset.num_classes must be an integer >= 1; got {k!r}")
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"Dataset.y must lie in [0, num_classes={k}); got labels from "
                             f"{y.min()} to {y.max()}")
        if not isinstance(self.name, str):
            raise ValueError(f"Dataset.name must be a str; got {type(self.name).__name__}")
        object.__setattr__(self, "x", np.ascontiguousarray(x, dtype=np.float32))
        object.__setattr__(self, "y", np.ascontiguousarray(y, dtype=np.int64))
        object.__setattr__(self, "num_classes", int(k))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (C, H, W) for images, (F,) for feature vectors."""
        return self.x.shape[1:]

    def take(self, indices, name: str | None = None) -> Dataset:
        """The samples at ``indices`` (a copy), with the same number of classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return Dataset(self.x[indices], self.y[indices], self.num_classes,
                       self.name if name is None else name)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, samples={len(self)}, "
                f"sample_shape={self.sample_shape}, num_classes={self.num_classes})")


# ---------------------------------------------------------------------------------------------
# digits

def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1797 samples, shape (N, 1, 8, 8), pixels scaled from
    0..16 to [0, 1], 10 classes."""
    from sklearn import datasets

    bunch = datasets.load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return Dataset(x, bunch.target.astype(np.int64), 10, "digits")


# ---------------------------------------------------------------------------------------------
# IDX (MNIST)

def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a native-endian array of its shape and
    type (uint8, int8, int16, int32, float32 or float64). A malformed file is a ValueError
    naming the path and the fault, found before more than the declared data is read."""
    where = repr(os.fspath(path))
    with open(path, "rb") as f:  # a missing file stays a FileNotFoundError
        size = os.fstat(f.fileno()).st_size
        # Decided by content, not by name: an IDX file starts with two zero bytes, gzip with
        # 1f 8b, and a browser may have unpacked a download that kept its ".gz".
        if f.read(2) != _GZIP_MAGIC:
            f.seek(0)
            return _read_idx_stream(f, where, size, None)
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                return _read_idx_stream(stream, where, None, DEFLATE_MAX_RATIO * size)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{where}: corrupt or truncated gzip data ({e})") from e


def _read_exactly(stream, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = stream.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _read_idx_stream(stream, where: str, size: int | None, most: int | None) -> np.ndarray:
    """The IDX array of ``stream``: a raw file of ``size`` bytes, or an inflating stream that
    may declare at most ``most`` bytes of data."""
    magic = _read_exactly(stream, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"{where} is not an IDX file: the magic number must start with two "
                         f"zero bytes; got {magic.hex(' ') or 'an empty file'}")
    code, ndim = magic[2], magic[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise ValueError(f"{where}: unknown IDX type code 0x{code:02X} (expected one of {known})")
    header = 4 + 4 * ndim
    dims = _read_exactly(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{where}: truncated header: {ndim} dimensions need {header} bytes, "
                         f"the file has {4 + len(dims)}")
    shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
    dtype = IDX_TYPES[code]
    need = dtype.itemsize * int(np.prod(shape, dtype=object))
    if size is not None and size - header != need:
        have = size - header
        if have < need:
            raise ValueError(f"{where}: truncated data: shape {shape} of {dtype.name} needs "
                             f"{need} bytes, the file has {have}")
        raise ValueError(f"{where}: {have - need} trailing bytes after the data of shape "
                         f"{shape}")
    if most is not None and need > most:
        raise ValueError(f"{where}: its header declares shape {shape} of {dtype.name} "
                         f"({need} bytes), more than the compressed file can hold "
                         f"({most} bytes at deflate's largest ratio)")
    try:
        raw = np.empty(need, np.uint8)
        array = raw.view(dtype).reshape(shape)
    except ValueError as e:
        raise ValueError(f"{where}: cannot hold shape {shape}: {e}") from None
    view, have = memoryview(raw), 0
    while have < need:
        n = stream.readinto(view[have:have + READ_CHUNK])
        if not n:
            raise ValueError(f"{where}: truncated data: shape {shape} of {dtype.name} needs "
                             f"{need} bytes, the file has {have}")
        have += n
    trailing = len(stream.read(_TRAILING_COUNTED + 1))
    if trailing:
        count = (f"more than {_TRAILING_COUNTED}" if trailing > _TRAILING_COUNTED
                 else str(trailing))
        raise ValueError(f"{where}: {count} trailing bytes after the data of shape {shape}")
    native = dtype.newbyteorder("=")
    if native != dtype:  # to native order in place: no second copy of the data
        array.byteswap(inplace=True)
    return array.view(native)


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one label per sample); got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer labels; got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{what} must be non-negative class indices; got {y.min()}")
    if len(y) and y.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{what} holds a label {y.max()} too large for a class index")
    return y.astype(np.int64)


def _samples(x: np.ndarray, what: str) -> np.ndarray:
    """The samples of any source, checked: a sample axis and more, real numbers, finite as
    float32 (floats come back as float32); (N, H, W) becomes (N, 1, H, W)."""
    if x.ndim < 2:
        raise ValueError(f"{what} must have a sample axis and at least one more; got shape "
                         f"{x.shape}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{what} must hold numbers; got dtype {x.dtype}")
    if x.dtype.kind == "f":
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused just below
            x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError(f"{what} holds NaN or infinite values (as float32)")
    if x.ndim == 3:  # (N, H, W) grey-scale images -> one channel
        x = x[:, None]
    return x


def _num_classes(*labels: np.ndarray) -> int:
    top = max((int(y.max()) for y in labels if len(y)), default=0)
    return max(top + 1, 2)


def _images_labels(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    x = _samples(read_idx(images_path), f"images {os.fspath(images_path)!r}")
    y = _labels(read_idx(labels_path), f"labels {os.fspath(labels_path)!r}")
    if len(x) != len(y):
        raise ValueError(f"images {os.fspath(images_path)!r} hold {len(x)} samples but labels "
                         f"{os.fspath(labels_path)!r} hold {len(y)}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    return x, y


def _default_name(images_path) -> str:
    folder = os.path.basename(os.path.dirname(os.path.abspath(images_path)))
    return folder or "idx"


def load_idx(images_path, labels_path, *, name: str | None = None,
             num_classes: int | None = None) -> Dataset:
    """A Dataset from an IDX image file and an IDX label file. uint8 pixels are scaled to
    [0, 1]; other types are converted to float32 as stored. (N, H, W) images become
    (N, 1, H, W). ``num_classes`` defaults to the largest label + 1 (at least 2); ``name``
    to the folder holding the images."""
    x, y = _images_labels(images_path, labels_path)
    k = _num_classes(y) if num_classes is None else num_classes
    return Dataset(x, y, k, _default_name(images_path) if name is None else name)


# ---------------------------------------------------------------------------------------------
# .npz

def load_npz(path, *, name: str | None = None) -> Dataset:
    """A Dataset from an .npz file holding ``x`` (N, ...) numbers and ``y`` (N,) non-negative
    integer labels. x becomes float32 as stored (no scaling); (N, H, W) becomes (N, 1, H, W),
    (N, F) stays. num_classes is the largest label + 1 (at least 2)."""
    where = repr(os.fspath(path))
    with open(path, "rb") as f:  # a missing file stays a FileNotFoundError
        signature = f.read(4)
    if signature not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ValueError(f"{where} is not an .npz archive (no zip signature at its start; "
                         f"got {signature!r})")
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            size = os.fstat(f.fileno()).st_size
            names = archive.namelist()
            files = [n.removesuffix(".npy") for n in names]
            arrays = {key: read_npy_member(archive, key + ".npy", size, compressed=True)
                      for key in ("x", "y") if key + ".npy" in names}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"{where} is not a readable .npz archive (corrupt or truncated?): "
                         f"{e}") from e
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise ValueError(f"{where} lacks the array(s) {missing}: a dataset .npz holds 'x' "
                         f"(samples) and 'y' (labels); it has {files}")
    x, y = arrays["x"], arrays["y"]
    x = _samples(x, f"{where}['x']")
    y = _labels(y, f"{where}['y']")
    if len(x) != len(y):
        raise ValueError(f"{where}: 'x' holds {len(x)} samples but 'y' holds {len(y)} labels")
    x = x.astype(np.float32, copy=False)
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return Dataset(x, y, _num_classes(y), stem if name is None else name)


# ---------------------------------------------------------------------------------------------
# one entry point

#: MNIST-style file names: (images, labels) per split, each also found with ".gz" and with
#: the dot that some mirrors use ("train-images.idx3-ubyte").
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _variants(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")
    return [base, base + ".gz", dotted, dotted + ".gz"]


def _find(prefix: str, base: str) -> str | None:
    for candidate in _variants(base):
        if os.path.isfile(prefix + candidate):
            return prefix + candidate
    return None


def _no_dataset(spec: str, prefix: str) -> str:
    """Why ``spec`` names no dataset: a missing path, a file that is neither an .npz nor IDX,
    a folder or a path prefix without the IDX files."""
    expected = ("a dataset is 'digits', an .npz file with x and y, or a folder (or path prefix) "
                "of MNIST-style IDX files")
    looked = (f"looked for {' and '.join(prefix + base for base in _IDX_NAMES['train'])} (also "
              f"with .gz, and .idx for -idx)")
    if os.path.isdir(spec):
        return f"{spec!r} is a folder without MNIST-style IDX files: {looked}"
    if os.path.isfile(spec):
        return f"{spec!r} is neither an .npz file nor a folder of MNIST-style IDX files: {expected}"
    folder, start = os.path.split(spec)
    try:
        is_prefix = bool(start) and any(n.startswith(start) for n in os.listdir(folder or "."))
    except OSError:
        is_prefix = False
    if is_prefix:
        return f"no MNIST-style IDX files with the path prefix {spec!r}: {looked}"
    return f"{spec!r} does not exist (neither a file nor a folder): {expected}"


def load(spec=None) -> tuple[Dataset, Dataset | None]:
    """``(train, test)`` for a dataset named by ``spec``; ``test`` is None where the source
    has no test split of its own (split one off with :func:`stratified_split`).

    - ``None`` or ``"digits"``: scikit-learn's digits (no test split).
    - a path ending in ``.npz``: :func:`load_npz` (no test split).
    - a folder, or a path prefix (``data/fashion-``), holding MNIST-style IDX files
      ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (also ``.gz``, also
      ``train-images.idx3-ubyte``): the train pair, and the ``t10k-*`` pair as the test split
      when present. Both splits share num_classes.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "digits"):
        return load_digits(), None
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be None, 'digits' or a path; got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.lower().endswith(".npz"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"dataset file {spec!r} does not exist")
        return load_npz(spec), None
    prefix = os.path.join(spec, "") if os.path.isdir(spec) else spec
    found = {split: [_find(prefix, base) for base in names]
             for split, names in _IDX_NAMES.items()}
    train_images, train_labels = found["train"]
    if train_images is None or train_labels is None:
        raise FileNotFoundError(_no_dataset(spec, prefix))
    test_images, test_labels = found["test"]
    if (test_images is None) != (test_labels is None):
        have, lack = ((test_images, _IDX_NAMES["test"][1]) if test_labels is None
                      else (test_labels, _IDX_NAMES["test"][0]))
        raise FileNotFoundError(f"{have!r} has no partner: looked for "
                                f"{[prefix + v for v in _variants(lack)]}")
    name = (os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec)
            else os.path.basename(spec).rstrip("-_.")) or _default_name(train_images)
    x, y = _images_labels(train_images, train_labels)
    if test_images is None:
        return Dataset(x, y, _num_classes(y), name), None
    tx, ty = _images_labels(test_images, test_labels)
    if tx.shape[1:] != x.shape[1:]:
        raise ValueError(f"test images {test_images!r} have sample shape {tx.shape[1:]}, train "
                         f"images {train_images!r} have {x.shape[1:]}")
    k = _num_classes(y, ty)
    return Dataset(x, y, k, name), Dataset(tx, ty, k, name + ":test")


# ---------------------------------------------------------------------------------------------
# splitting

def stratified_split(dataset: Dataset, test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into (train, test) class by class, so each class keeps its share in both
    (scikit-learn's ``train_test_split(stratify=y)``: ``ceil(test_fraction * N)`` test
    samples, each class's count within one of its share of them); the same seed gives the
    same split. Every class needs at least two samples."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset; got {type(dataset).__name__}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    counts = np.bincount(dataset.y, minlength=dataset.num_classes)
    present = counts[counts > 0]
    if len(present) and present.min() < 2:
        lonely = [int(c) for c in np.flatnonzero(counts == 1)]
        raise ValueError(f"stratified_split needs at least two samples of every class; "
                         f"classes {lonely} of {dataset.name!r} have one")
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(dataset)), test_size=test_fraction,
                                           stratify=dataset.y, random_state=int(seed))
    return (dataset.take(train_idx, dataset.name + ":train"),
            dataset.take(test_idx, dataset.name + ":test"))
