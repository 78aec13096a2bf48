"""Checkpoint files: a nested state (model, optimizer, scheduler, trainer counters) on disk.

Format
    An .npz archive (a zip of .npy members, readable with ``np.load``): every array is a
    member named by its key path (``model/0/weight``; ``~2``, ``~3``... appended where two
    paths would collide), and the member ``__gpunn__`` holds the rest as UTF-8 JSON: the
    format name and version and the tree, in which an array is a reference to its member.

    Tree values: dicts (str or int keys, order kept), lists, tuples, None, bool, int, float
    (inf and NaN too), str, NumPy arrays (any numeric, bool, str or structured dtype, 0-d and
    empty too; ml_dtypes' bfloat16 & co. as their bits), NumPy scalars (back as the same
    scalar type) and CuPy arrays (saved from the device, loaded as NumPy).

Bounded reading
    ``load`` never unpickles and reads no more than the file holds: members must be stored
    uncompressed (as ``save`` writes them), each member's .npy header must declare exactly the
    size the zip directory gives it, a member is read once (no tree may reference it twice),
    and states nest at most :data:`MAX_DEPTH` containers deep (``save`` refuses deeper ones).

Atomic writes
    ``save`` writes a temporary file in the destination folder, flushes and fsyncs it, then
    renames it over ``path`` (``os.replace``, atomic on POSIX and Windows): ``path`` holds the
    old checkpoint or the new one, never a partial file, whatever fails or when.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT = "gpunn-checkpoint"
VERSION = 1
_META = "__gpunn__"

#: the deepest nesting of containers (dicts, lists, tuples) a checkpoint's state may have
MAX_DEPTH = 64
#: the JSON nesting that MAX_DEPTH containers need: the metadata object, 3 levels per dict
#: ({"dict": [[key, value]]}), the node of an array
_MAX_JSON_DEPTH = 3 * MAX_DEPTH + 2
#: deflate's largest possible ratio of inflated to compressed bytes
DEFLATE_MAX_RATIO = 1032
#: the longest .npy header read (NumPy's own limit)
_MAX_NPY_HEADER = 10000
#: bytes read (and inflated) at a time into an array
READ_CHUNK = 1 << 18


class _Encoder:
    """Turns the state into a JSON tree plus {member name: array}."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self._open: set[int] = set()  # containers on the current path (cycle check)

    def member(self, path: str) -> str:
        name, k = path or "_", 1
        while name == _META or name in self.arrays:
            k += 1
            name = f"{path}~{k}"
        return name

    def array(self, a: np.ndarray, path: str, kind: str) -> dict:
        if a.dtype.hasobject:
            raise TypeError(f"checkpoint state {path!r}: arrays of Python objects cannot be "
                            f"saved (dtype {a.dtype})")
        node = {kind: None}
        if a.dtype.kind == "V" and a.dtype.names is None:  # bfloat16, float8...: keep the bits
            node["dtype"] = a.dtype.name
            a = a.view(np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8)
                       else np.dtype((np.void, a.dtype.itemsize)))
        name = self.member(path)
        self.arrays[name] = a
        node[kind] = name
        return node

    def encode(self, value, path: str, depth: int = 0):
        # NumPy first: np.float64 is a float and np.str_ a str, but they come back as themselves
        if isinstance(value, np.ndarray):
            return self.array(value, path, "array")
        if isinstance(value, np.generic):
            return self.array(np.asarray(value), path, "scalar")
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "get"):
            return self.array(value.get(), path, "array")
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise ValueError(f"checkpoint state {path!r} nests containers more than "
                                 f"{MAX_DEPTH} deep")
            if id(value) in self._open:
                raise ValueError(f"checkpoint state {path!r} contains itself")
            self._open.add(id(value))
            try:
                if isinstance(value, dict):
                    items = []
                    for key, v in value.items():
                        if isinstance(key, bool) or not isinstance(key, (str, int, np.integer)):
                            raise TypeError(f"checkpoint state {path!r}: keys must be str or "
                                            f"int; got {key!r} ({type(key).__name__})")
                        key = key if isinstance(key, str) else int(key)
                        items.append([key, self.encode(v, _join(path, key), depth + 1)])
                    return {"dict": items}
                encoded = [self.encode(v, _join(path, i), depth + 1)
                           for i, v in enumerate(value)]
                return encoded if isinstance(value, list) else {"tuple": encoded}
            finally:
                self._open.discard(id(value))
        raise TypeError(f"checkpoint state {path!r}: cannot save a {type(value).__name__} "
                        f"(convert tensors to NumPy arrays first)")


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def save(path, state: dict) -> None:
    """Write ``state`` (a dict; see the module docstring for what it may hold) to ``path``,
    atomically. Nothing is written if the state cannot be saved (TypeError/ValueError naming
    the offending key path); a folder that cannot be written to is an OSError naming it."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    path = os.fspath(path)
    encoder = _Encoder()
    tree = encoder.encode(state, "")
    meta = json.dumps({"format": FORMAT, "version": VERSION, "tree": tree},
                      ensure_ascii=False, allow_nan=True).encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path {path!r} is a folder")
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.",
                                          suffix=".tmp", delete=False)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write a checkpoint in folder {folder!r}: "
                               f"{e.strerror}", folder) from e
    try:
        with tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                archive.writestr(_META + ".npy", _npy(np.frombuffer(meta, np.uint8)))
                for name, a in encoder.arrays.items():
                    with archive.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, a, allow_pickle=False)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, mode)
        os.replace(tmp.name, path)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except OSError:
            pass
        raise
    _sync_folder(folder)


def _npy(a: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def _sync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_npy_member(archive: zipfile.ZipFile, name: str, file_size: int, *,
                    compressed: bool = False) -> np.ndarray:
    """The .npy member ``name`` of ``archive`` (a zip file of ``file_size`` bytes), read
    within what it declares: stored (or, with ``compressed``, deflated at most
    :data:`DEFLATE_MAX_RATIO` times) within the file, its .npy header declaring exactly the
    zip directory's size, no Python objects. A fresh, writeable array; ValueError (or
    zipfile.BadZipFile) naming the member otherwise, before the data is read."""
    info = archive.getinfo(name)
    methods = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) if compressed else (zipfile.ZIP_STORED,)
    if info.compress_type not in methods:
        raise ValueError(f"member {name!r} is compressed (method {info.compress_type}); "
                         + ("only stored or deflated members are read" if compressed else
                            "checkpoint members are stored uncompressed"))
    if info.header_offset + info.compress_size > file_size:
        raise ValueError(f"member {name!r} declares {info.compress_size} bytes at offset "
                         f"{info.header_offset}, beyond the file's {file_size} bytes")
    limit = (info.compress_size if info.compress_type == zipfile.ZIP_STORED
             else DEFLATE_MAX_RATIO * info.compress_size)
    if info.file_size > limit:
        raise ValueError(f"member {name!r} declares {info.file_size} bytes, more than its "
                         f"{info.compress_size} stored bytes can hold")
    with archive.open(info) as member:
        header, shape, fortran_order, dtype = _npy_header(member, name)
        count = 1
        for d in shape:
            count *= d
        if header + count * dtype.itemsize != info.file_size:
            raise ValueError(f"member {name!r}: its .npy header declares shape {shape} of "
                             f"{dtype} ({count * dtype.itemsize} bytes of data after {header} of "
                             f"header), the zip directory {info.file_size} bytes")
        a = np.empty(count, dtype)
        if a.nbytes:
            flat, done = a.view(np.uint8), 0
            while done < a.nbytes:
                chunk = member.read(min(a.nbytes - done, READ_CHUNK))
                if not chunk:
                    raise ValueError(f"member {name!r} is truncated")
                flat[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                done += len(chunk)
        if member.read(1):  # also reaches the end, where zipfile checks the CRC
            raise ValueError(f"member {name!r} has bytes after its array")
    return a.reshape(shape[::-1]).T if fortran_order else a.reshape(shape)


def _npy_header(member, name: str):
    """(header bytes, shape, fortran_order, dtype) from the start of an .npy stream."""
    start = member.read(8)
    magic = np.lib.format.MAGIC_PREFIX
    if len(start) < 8 or start[:6] != magic or start[6] not in (1, 2, 3):
        raise ValueError(f"member {name!r} is not an .npy array (magic {start[:8]!r})")
    length_format = "<H" if start[6] == 1 else "<I"
    size = struct.calcsize(length_format)
    raw = member.read(size)
    if len(raw) < size:
        raise ValueError(f"member {name!r} has a truncated .npy header")
    (length,) = struct.unpack(length_format, raw)
    if length > _MAX_NPY_HEADER:
        raise ValueError(f"member {name!r} has a {length}-byte .npy header (at most "
                         f"{_MAX_NPY_HEADER} are read)")
    text = member.read(length)
    try:
        fields = ast.literal_eval(text.decode("utf-8" if start[6] == 3 else "latin1"))
        shape, fortran_order = fields["shape"], fields["fortran_order"]
        dtype = np.lib.format.descr_to_dtype(fields["descr"])
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError,
            UnicodeDecodeError) as e:
        raise ValueError(f"member {name!r} has a malformed .npy header: "
                         f"{type(e).__name__}: {e}") from None
    if len(text) < length or not isinstance(fields, dict) or set(fields) != {
            "shape", "fortran_order", "descr"} or not isinstance(fortran_order, bool) \
            or not isinstance(shape, tuple) \
            or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"member {name!r} has a malformed .npy header: {text[:200]!r}")
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects (dtype {dtype}), which are "
                         f"never unpickled")
    # what an array of it holds: NumPy makes 'S0'/'U0' one character wide
    return 8 + size + length, shape, fortran_order, np.empty(0, dtype).dtype


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _json_depth(text: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest."""
    brackets = np.frombuffer(re.sub(rb"[^][{}]", b"", _JSON_STRING.sub(b"", text)), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max()) if len(steps) else 0


class _Decoder:
    def __init__(self, archive: zipfile.ZipFile, where: str, file_size: int):
        self.archive = archive
        self.where = where
        self.file_size = file_size
        self.used: set[str] = set()

    def read(self, name: str) -> np.ndarray:
        if not isinstance(name, str) or name in self.used:
            raise ValueError(f"member {name!r} is referenced twice or is not a name")
        self.used.add(name)
        return read_npy_member(self.archive, name + ".npy", self.file_size)

    def array(self, node: dict, kind: str):
        a = self.read(node[kind])
        if "dtype" in node:
            a = a.view(_named_dtype(node["dtype"], self.where))
        return a[()] if kind == "scalar" else a

    def decode(self, node):
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "dict" in node:
            return {key: self.decode(v) for key, v in node["dict"]}
        if "tuple" in node:
            return tuple(self.decode(v) for v in node["tuple"])
        for kind in ("array", "scalar"):
            if kind in node:
                return self.array(node, kind)
        raise ValueError(f"unknown node {sorted(node)}")


def _named_dtype(name: str, where: str) -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    if ml_dtypes is None or not hasattr(ml_dtypes, name):
        raise ValueError(f"{where} holds {name} arrays; reading them needs the ml_dtypes "
                         f"package")
    return np.dtype(getattr(ml_dtypes, name))


def load(path) -> dict:
    """The state saved by :func:`save` at ``path``, arrays as NumPy arrays. A file that is
    not a gpunn checkpoint, or is truncated or corrupt, is a ValueError naming the path."""
    path = os.fspath(path)
    where = repr(path)
    with open(path, "rb") as f:  # a missing file stays a FileNotFoundError
        try:
            with zipfile.ZipFile(f) as archive:
                if _META + ".npy" not in archive.namelist():
                    raise _NotOurs(f"{where} is not a gpunn checkpoint (a zip/npz archive "
                                   f"without the {_META!r} member)")
                decoder = _Decoder(archive, where, os.fstat(f.fileno()).st_size)
                text = decoder.read(_META)
                if text.dtype != np.uint8 or text.ndim != 1:
                    raise ValueError(f"its {_META!r} member is not UTF-8 bytes")
                text = text.tobytes()
                if _json_depth(text) > _MAX_JSON_DEPTH:
                    raise ValueError(f"its state nests deeper than {MAX_DEPTH} containers")
                meta = json.loads(text.decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise _NotOurs(f"{where} is not a gpunn checkpoint (its {_META!r} member "
                                   f"does not name the format {FORMAT!r})")
                version = meta.get("version")
                if not isinstance(version, int) or version > VERSION:
                    raise _NotOurs(f"{where} is a gpunn checkpoint of format version "
                                   f"{version!r}; this gpunn reads versions up to {VERSION}")
                state = decoder.decode(meta["tree"])
        except _NotOurs as e:
            raise ValueError(str(e)) from None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{where} is not a gpunn checkpoint, or is truncated or corrupt: "
                             f"{e}") from e
        except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error,
                UnicodeDecodeError) as e:
            raise ValueError(f"{where} is a truncated or corrupt checkpoint: "
                             f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{where} is a corrupt checkpoint: its state is a "
                         f"{type(state).__name__}, not a dict")
    return state


class _NotOurs(Exception):
    pass
