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

Atomic writes
    ``save`` writes a temporary file in the destination folder, flushes and fsyncs it, then
    renames it over ``path`` (``os.replace``, atomic on POSIX and Windows): ``path`` holds the
    old checkpoint or the new one, never a partial file, whatever fails or when.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT = "gpunn-checkpoint"
VERSION = 1
_META = "__gpunn__"


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

    def encode(self, value, path: str):
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
                        items.append([key, self.encode(v, _join(path, key))])
                    return {"dict": items}
                encoded = [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
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


class _Decoder:
    def __init__(self, archive: zipfile.ZipFile, where: str):
        self.archive = archive
        self.where = where

    def read(self, name: str) -> np.ndarray:
        with self.archive.open(name + ".npy") as member:
            a = np.lib.format.read_array(member, allow_pickle=False)
            if member.read(1):  # also reaches the end, where zipfile checks the CRC
                raise ValueError(f"member {name!r} has bytes after its array")
        return a

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
                decoder = _Decoder(archive, where)
                meta = json.loads(decoder.read(_META).tobytes().decode("utf-8"))
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
