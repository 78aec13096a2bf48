"""Checkpoint files: round trips of nested states, atomic replacement when a write fails,
truncated/corrupt/foreign files, unwritable folders."""

import json
import os
import zipfile

import numpy as np
import pytest

from gpunn import checkpoint

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    a = rng.standard_normal(shape) * 100
    if dtype.kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    return np.asarray(a).astype(dtype)  # shape (): a 0-d array, not a NumPy scalar


def assert_same(out, ref, where="state"):
    """Equal values and equal types, all the way down (arrays: dtype, shape, bits)."""
    assert type(out) is type(ref), (where, type(out), type(ref))
    if isinstance(ref, dict):
        assert list(out) == list(ref), where  # same keys (types included), same order
        for key in ref:
            assert type(next(k for k in out if k == key)) is type(key), (where, key)
            assert_same(out[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(out) == len(ref), where
        for i, (o, r) in enumerate(zip(out, ref)):
            assert_same(o, r, f"{where}[{i}]")
    elif isinstance(ref, (np.ndarray, np.generic)):
        assert out.dtype == ref.dtype and out.shape == ref.shape, where
        np.testing.assert_array_equal(out, ref, err_msg=where)
    elif isinstance(ref, float) and np.isnan(ref):
        assert np.isnan(out), where
    else:
        assert out == ref, where


def example_state(rng):
    return {
        "model": {
            "0": {"weight": random_array(rng, "float32", (4, 3)),
                  "bias": random_array(rng, "float32", (4,))},
            "1": {"running_mean": random_array(rng, "float64", (7,)),
                  "num_batches_tracked": np.array(12, np.int64)},
        },
        "optimizer": {
            "state": {0: {"step": np.float32(3), "exp_avg": random_array(rng, "float32", (4, 3))},
                      1: {"step": np.float32(3), "exp_avg": random_array(rng, "float32", (4,))}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": 0.0, "amsgrad": False, "params": [0, 1],
                              "foreach": None}],
        },
        "scheduler": {"last_epoch": 5, "base_lrs": [0.1, 0.2], "_last_lr": [0.05, 0.1]},
        "epoch": 7, "best": float("inf"), "worst": float("-inf"), "nan": float("nan"),
        "huge": 2**80, "negative": -3, "flag": True, "nothing": None,
        "name": "résumé ∑ 数字 🙂", "ключ": "значение",
        "empty_dict": {}, "empty_list": [], "empty_tuple": (),
        "np_values": [np.float64(0.1), np.str_("s"), np.bool_(True), np.int8(-3),
                      np.uint64(2**64 - 1), np.complex64(1 - 2j), np.float16(0.5)],
        "mixed": [1, "two", 3.0, None, [np.arange(3, dtype=np.int16)], {"k": (1, [2])}],
    }


def test_round_trip(tmp_path, rng):
    state = example_state(rng)
    path = tmp_path / "ck.npz"
    checkpoint.save(path, state)
    assert_same(checkpoint.load(path), state)
    assert_same(checkpoint.load(str(path)), state)  # str and PathLike both work


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_dtypes(tmp_path, rng, dtype):
    state = {"a": {s: random_array(rng, dtype, shape)
                   for s, shape in [("scalar0d", ()), ("empty", (0,)), ("empty2", (3, 0, 2)),
                                    ("one", (1,)), ("odd", (7, 13)), ("deep", (2, 1, 3, 2))]},
             "np_scalar": random_array(rng, dtype, (1,))[0]}
    checkpoint.save(tmp_path / "d.ck", state)
    back = checkpoint.load(tmp_path / "d.ck")
    assert_same(back, state)
    assert all(a.flags.writeable for a in back["a"].values())


def test_round_trip_odd_arrays(tmp_path, rng):
    base = random_array(rng, "float32", (6, 8))
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))])
    structured["a"] = [1, 2, 3]
    structured["b"] = rng.standard_normal((3, 2))
    state = {
        "transposed": base.T,                # not C-contiguous
        "strided": base[::2, 1::3],
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
        "strings": np.array(["a", "ünï", "🙂", ""]),
        "bytes": np.array([b"x", b"yz"]),
        "structured": structured,
        "datetime": np.array(["2024-01-02"], dtype="datetime64[D]"),
    }
    checkpoint.save(tmp_path / "o.ck", state)
    back = checkpoint.load(tmp_path / "o.ck")
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key


def test_round_trip_bfloat16(tmp_path, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = rng.standard_normal((5, 3)).astype(ml_dtypes.bfloat16)
    f8 = rng.standard_normal(4).astype(ml_dtypes.float8_e4m3fn)
    state = {"w": a, "f8": f8, "s": a[0, 0]}
    checkpoint.save(tmp_path / "b.ck", state)
    back = checkpoint.load(tmp_path / "b.ck")
    assert back["w"].dtype == a.dtype and back["f8"].dtype == f8.dtype
    np.testing.assert_array_equal(back["w"].view(np.uint16), a.view(np.uint16))
    np.testing.assert_array_equal(back["f8"].view(np.uint8), f8.view(np.uint8))
    assert type(back["s"]) is type(a[0, 0]) and back["s"] == a[0, 0]


def test_file_is_an_npz_keyed_by_path(tmp_path, rng):
    state = example_state(rng)
    path = tmp_path / "ck.npz"
    checkpoint.save(path, state)
    with np.load(path, allow_pickle=False) as archive:
        np.testing.assert_array_equal(archive["model/0/weight"], state["model"]["0"]["weight"])
        np.testing.assert_array_equal(archive["optimizer/state/1/exp_avg"],
                                      state["optimizer"]["state"][1]["exp_avg"])
        np.testing.assert_array_equal(archive["mixed/4/0"], state["mixed"][4][0])
        meta = json.loads(archive["__gpunn__"].tobytes())
    assert meta["format"] == checkpoint.FORMAT and meta["version"] == checkpoint.VERSION


def test_colliding_paths(tmp_path, rng):
    """Keys holding '/' and a key named like the metadata member still round-trip."""
    state = {"a/b": rng.standard_normal(2), "a": {"b": rng.standard_normal(3)},
             "__gpunn__": rng.standard_normal(4), "a~2": np.arange(2), "": {"": np.ones(1)}}
    checkpoint.save(tmp_path / "c.ck", state)
    assert_same(checkpoint.load(tmp_path / "c.ck"), state)


def test_overwrite_and_mode(tmp_path, rng):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"v": 1})
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    os.chmod(path, 0o640)
    checkpoint.save(path, {"v": 2, "w": np.ones(3)})
    assert checkpoint.load(path)["v"] == 2
    assert os.stat(path).st_mode & 0o777 == 0o640  # an existing file keeps its mode
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_state_writes_nothing(tmp_path):
    path = tmp_path / "ck.npz"
    cycle = {"a": []}
    cycle["a"].append(cycle)
    cases = [
        ({"model": {"w": {1, 2}}}, TypeError, "'model/w'.*set"),
        ({"opt": [np.ones(2), object()]}, TypeError, "'opt/1'"),
        ({"objs": np.array([None, 1], dtype=object)}, TypeError, "'objs'.*Python objects"),
        ({"x": {(1, 2): 3}}, TypeError, "'x'.*keys must be str or int"),
        ({"x": {True: 3}}, TypeError, "keys must be str or int"),
        ({"b": b"bytes"}, TypeError, "'b'.*bytes"),
        (cycle, ValueError, "contains itself"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            checkpoint.save(path, state)
        assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="state must be a dict"):
        checkpoint.save(path, [np.ones(2)])
    with pytest.raises(IsADirectoryError, match="folder"):
        checkpoint.save(tmp_path, {"a": 1})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["replace", "write", "fsync", "interrupt"])
def test_failed_save_keeps_old_file(tmp_path, rng, monkeypatch, where):
    path = tmp_path / "ck.npz"
    old = {"model": {"w": rng.standard_normal((50, 50))}, "epoch": 1}
    checkpoint.save(path, old)
    before = path.read_bytes()
    new = {"model": {"w": rng.standard_normal((50, 50)), "v": rng.standard_normal(9)},
           "epoch": 2}

    class Boom(Exception):
        pass

    error = Boom
    if where == "replace":
        def fail(*args, **kwargs):
            raise Boom()
        monkeypatch.setattr(checkpoint.os, "replace", fail)
    elif where == "write":  # mid-way: after the first array has been written
        real = np.lib.format.write_array
        calls = []

        def fail(*args, **kwargs):
            if calls:
                raise Boom()
            calls.append(1)
            return real(*args, **kwargs)
        monkeypatch.setattr(checkpoint.np.lib.format, "write_array", fail)
    elif where == "fsync":
        def fail(fd):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpoint.os, "fsync", fail)
        error = OSError
    else:
        def fail(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(checkpoint.os, "replace", fail)
        error = KeyboardInterrupt
    with pytest.raises(error):
        checkpoint.save(path, new)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.npz"]  # no temporary file left
    monkeypatch.undo()
    assert_same(checkpoint.load(path), old)
    checkpoint.save(path, new)
    assert_same(checkpoint.load(path), new)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk gone")
    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(RuntimeError):
        checkpoint.save(tmp_path / "ck.npz", {"w": np.ones(4)})
    assert os.listdir(tmp_path) == []


def test_truncated_file(tmp_path, rng):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, example_state(rng))
    raw = path.read_bytes()
    for cut in sorted({0, 1, 10, 100, len(raw) // 3, len(raw) // 2, len(raw) - 100,
                       len(raw) - 22, len(raw) - 1}):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError) as info:
            checkpoint.load(bad)
        assert f"cut{cut}.npz" in str(info.value), cut


def test_corrupt_bytes(tmp_path, rng):
    """A flipped byte inside an array's data is caught by the zip CRC."""
    path = tmp_path / "ck.npz"
    w = rng.standard_normal(1000)
    checkpoint.save(path, {"w": w})
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("w.npy")
    raw = bytearray(path.read_bytes())
    # the member's data starts after its local header (30 bytes + name + extra field)
    name_len, extra_len = np.frombuffer(raw, "<u2", 2, info.header_offset + 26)
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    raw[start + info.file_size - 50] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt.*CRC"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.ones(3))
    with pytest.raises(ValueError, match="not a gpunn checkpoint"):
        checkpoint.load(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("hello, not a zip")
    with pytest.raises(ValueError, match="text.npz' is not a gpunn checkpoint"):
        checkpoint.load(tmp_path / "text.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz"):
        checkpoint.load(tmp_path / "empty.npz")
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.npz")


def _with_meta(path, meta: bytes):
    buffer = checkpoint._npy(np.frombuffer(meta, np.uint8))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__gpunn__.npy", buffer)


def test_foreign_or_newer_metadata(tmp_path):
    cases = {
        "other": (json.dumps({"format": "someone-else", "version": 1, "tree": {}}),
                  "not a gpunn checkpoint"),
        "newer": (json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1,
                              "tree": {"dict": []}}), "format version 2"),
        "notjson": ("{not json", "corrupt"),
        "list": (json.dumps([1, 2]), "not a gpunn checkpoint"),
        "notree": (json.dumps({"format": checkpoint.FORMAT, "version": 1}), "corrupt"),
        "dangling": (json.dumps({"format": checkpoint.FORMAT, "version": 1,
                                 "tree": {"dict": [["w", {"array": "w"}]]}}), "corrupt"),
        "rootlist": (json.dumps({"format": checkpoint.FORMAT, "version": 1, "tree": [1]}),
                     "not a dict"),
    }
    for name, (meta, message) in cases.items():
        path = tmp_path / f"{name}.ck"
        _with_meta(path, meta.encode())
        with pytest.raises(ValueError, match=message) as info:
            checkpoint.load(path)
        assert f"{name}.ck" in str(info.value), name


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        checkpoint.save(tmp_path / "nope" / "ck.npz", {"a": 1})


def test_unwritable_folder_message(tmp_path, monkeypatch):
    """The folder is named in the error (simulated: root ignores permissions)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(checkpoint.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(PermissionError, match=f"folder '{tmp_path}'.*Permission denied"):
        checkpoint.save(tmp_path / "ck.npz", {"a": 1})


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    checkpoint.save(folder / "ck.npz", {"a": 1})
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"folder '{folder}'"):
            checkpoint.save(folder / "ck.npz", {"a": 2})
        assert checkpoint.load(folder / "ck.npz") == {"a": 1}
    finally:
        folder.chmod(0o700)


@pytest.mark.gpu
def test_cupy_arrays(tmp_path, rng):
    import cupy

    w = rng.standard_normal((3, 4)).astype(np.float32)
    checkpoint.save(tmp_path / "g.ck", {"w": cupy.asarray(w), "h": cupy.asarray(w, cupy.float16)})
    back = checkpoint.load(tmp_path / "g.ck")
    assert isinstance(back["w"], np.ndarray) and back["h"].dtype == np.float16
    np.testing.assert_array_equal(back["w"], w)
    np.testing.assert_array_equal(back["h"], w.astype(np.float16))
