"""Loaders bound their work by what the file declares (DESIGN.md, Safety): small bombs built
here (gzip'd IDX files, zip members whose declared sizes lie, compressed or twice-referenced
checkpoint members, deeply nested metadata) are refused while holding little memory
(measured with tracemalloc: bytes, not time), and nothing is ever unpickled."""

import gzip
import json
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from gpunn import checkpoint, data
from gpunn.data import read_idx

MB = 1 << 20


def refused_within(limit: int, call, error=ValueError, match=None):
    """Run ``call``, expecting ``error``; returns the error's text after checking that the
    peak of traced Python/NumPy memory stayed under ``limit`` bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"
    return str(info.value)


def idx_header(code: int, shape) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def npy(a: np.ndarray) -> bytes:
    return checkpoint._npy(a)


def npy_header(shape, descr="<f8") -> bytes:
    """An .npy header alone (version 1.0) declaring ``shape`` of ``descr``."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    text = text.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def set_declared_size(path, member: str, size: int) -> None:
    """Rewrite the zip directory's uncompressed size of ``member`` (the data stays)."""
    raw = bytearray(path.read_bytes())
    start = 0
    while True:
        start = raw.index(b"PK\x01\x02", start)
        name_len = struct.unpack_from("<H", raw, start + 28)[0]
        if raw[start + 46:start + 46 + name_len] == member.encode():
            struct.pack_into("<I", raw, start + 24, size)
            break
        start += 4
    path.write_bytes(bytes(raw))


# --- IDX ---------------------------------------------------------------------------------------


def test_gzip_idx_declaring_one_byte_is_refused_without_inflating_the_rest(tmp_path):
    """The header says 1 byte; 16 MB of zeros follow in ~16 KB of gzip."""
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, (1,)) + bytes(16 * MB + 1), 9))
    assert path.stat().st_size < MB // 8
    text = refused_within(2 * MB, lambda: read_idx(path),
                          match="more than 65536 trailing bytes after the data of shape")
    assert "bomb.gz" in text


def test_gzip_idx_declaring_more_than_it_can_inflate_to_is_refused_first(tmp_path):
    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(idx_header(0x0E, (1 << 20, 1 << 10)) + bytes(64)))
    text = refused_within(MB, lambda: read_idx(path),
                          match=r"declares shape \(1048576, 1024\) of float64 \(8589934592 "
                                r"bytes\), more than the compressed file can hold")
    assert "big.gz" in text


def test_raw_idx_declaring_more_than_the_file_is_refused_first(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(idx_header(0x0D, (1 << 30, 1 << 30)) + bytes(8))
    refused_within(MB, lambda: read_idx(path),
                   match=r"truncated data: shape \(1073741824, 1073741824\) of float32 needs "
                         r"4611686018427387904 bytes, the file has 8")


def test_gzip_idx_declaring_its_size_reads_it(tmp_path):
    values = np.arange(3 * MB, dtype=np.uint8).reshape(3, MB)
    path = tmp_path / "ok.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, values.shape) + values.tobytes()))
    tracemalloc.start()
    try:
        out = read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, values)
    assert peak < values.nbytes + 2 * MB  # the array and chunks, not a second copy


# --- checkpoints ---------------------------------------------------------------------------------


def test_compressed_checkpoint_member_is_refused(tmp_path):
    """A member deflated from 16 MB of zeros to a few KB (save writes members stored)."""
    good = tmp_path / "good.ck"
    checkpoint.save(good, {"w": np.zeros(2 * MB)})
    bomb = tmp_path / "bomb.ck"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert bomb.stat().st_size < MB // 8
    text = refused_within(MB, lambda: checkpoint.load(bomb),
                          match="is compressed.*checkpoint members are stored uncompressed")
    assert "bomb.ck" in text


def _checkpoint_with(path, tree, members: dict) -> None:
    meta = json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.VERSION,
                       "tree": tree}).encode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__gpunn__.npy", npy(np.frombuffer(meta, np.uint8)))
        for name, payload in members.items():
            archive.writestr(name, payload)


def test_npy_header_declaring_more_than_the_member_is_refused(tmp_path):
    path = tmp_path / "liar.ck"
    _checkpoint_with(path, {"dict": [["w", {"array": "w"}]]},
                     {"w.npy": npy_header((1 << 30, 1 << 20)) + bytes(8)})
    text = refused_within(MB, lambda: checkpoint.load(path),
                          match=r"member 'w.npy': its .npy header declares shape "
                                r"\(1073741824, 1048576\) of float64")
    assert "liar.ck" in text


def test_zip_directory_declaring_more_than_the_member_holds_is_refused(tmp_path):
    path = tmp_path / "dir.ck"
    checkpoint.save(path, {"w": np.ones(1000)})
    set_declared_size(path, "w.npy", 1 << 31)
    refused_within(MB, lambda: checkpoint.load(path),
                   match=r"member 'w.npy' declares 2147483648 bytes, more than its \d+ stored "
                         r"bytes can hold")


def test_member_referenced_twice_is_refused(tmp_path):
    """A tiny tree naming one member many times would read it again for each reference."""
    path = tmp_path / "twice.ck"
    _checkpoint_with(path, [{"array": "w"}] * 1000, {"w.npy": npy(np.zeros(MB // 8))})
    refused_within(8 * MB, lambda: checkpoint.load(path), match="'w' is referenced twice")


def test_object_arrays_are_never_unpickled(tmp_path, monkeypatch):
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    payload = npy_header((2,), "|O") + pickle.dumps([1, 2])
    path = tmp_path / "objects.ck"
    _checkpoint_with(path, {"dict": [["w", {"array": "w"}]]}, {"w.npy": payload})
    with pytest.raises(ValueError, match="holds Python objects.*never unpickled"):
        checkpoint.load(path)
    with zipfile.ZipFile(tmp_path / "objects.npz", "w") as archive:
        archive.writestr("x.npy", payload)
        archive.writestr("y.npy", npy(np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="objects.npz.*holds Python objects"):
        data.load_npz(tmp_path / "objects.npz")


def test_deeply_nested_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.ck"
    tree = "[" * 10000 + "]" * 10000  # as text: json.dumps itself would recurse too deep
    meta = ('{"format": "%s", "version": %d, "tree": %s}'
            % (checkpoint.FORMAT, checkpoint.VERSION, tree)).encode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__gpunn__.npy", npy(np.frombuffer(meta, np.uint8)))
    with pytest.raises(ValueError, match=r"deep.ck.*nests deeper than 64 containers"):
        checkpoint.load(path)


def test_nesting_limit_is_the_same_for_save_and_load(tmp_path):
    def nested(depth, leaf):
        state = leaf
        for i in range(depth - 1):
            state = {"k": state} if i % 3 == 0 else [state] if i % 3 == 1 else (state,)
        return {"top": state}

    deepest = nested(checkpoint.MAX_DEPTH, np.arange(3))
    checkpoint.save(tmp_path / "ok.ck", deepest)
    back = checkpoint.load(tmp_path / "ok.ck")
    node = back["top"]
    for _ in range(checkpoint.MAX_DEPTH - 1):
        node = node["k"] if isinstance(node, dict) else node[0]
    np.testing.assert_array_equal(node, np.arange(3))
    with pytest.raises(ValueError, match=r"nests containers more than 64 deep"):
        checkpoint.save(tmp_path / "deep.ck", nested(checkpoint.MAX_DEPTH + 1, 1))
    assert not (tmp_path / "deep.ck").exists()


def test_loaded_arrays_are_fresh_and_writeable(tmp_path):
    state = {"w": np.arange(6.0).reshape(2, 3), "f": np.asfortranarray(np.ones((3, 2))),
             "s": np.float32(2), "e": np.zeros((0, 4))}
    checkpoint.save(tmp_path / "ck", state)
    back = checkpoint.load(tmp_path / "ck")
    for key in ("w", "f", "e"):
        assert back[key].flags.writeable, key
        back[key][...] = 7  # the model writes what it loads in place
    assert back["f"].flags.f_contiguous


# --- dataset .npz ------------------------------------------------------------------------------


def test_npz_member_declaring_more_than_deflate_can_hold_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez_compressed(path, x=np.zeros((100, 10)), y=np.zeros(100, np.int64))
    set_declared_size(path, "x.npy", 1 << 31)
    text = refused_within(MB, lambda: data.load_npz(path),
                          match=r"member 'x.npy' declares 2147483648 bytes, more than its")
    assert "x.npz" in text


def test_npz_header_declaring_more_than_the_member_is_refused(tmp_path):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_header((1 << 30, 64)) + bytes(64))
        archive.writestr("y.npy", npy(np.zeros(4, np.int64)))
    refused_within(MB, lambda: data.load_npz(path),
                   match=r"liar.npz.*declares shape \(1073741824, 64\) of float64")


def test_compressed_npz_dataset_still_loads(tmp_path, rng):
    x = rng.standard_normal((50, 4, 4)).astype(np.float32)
    y = np.arange(50) % 3
    np.savez_compressed(tmp_path / "ok.npz", x=x, y=y)
    ds = data.load_npz(tmp_path / "ok.npz")
    np.testing.assert_array_equal(ds.x[:, 0], x)
    np.testing.assert_array_equal(ds.y, y)


def test_zero_width_dtype_cannot_declare_elements_for_free(tmp_path):
    """NumPy gives 'S0' one byte per element: a header of 2^40 of them and no data is refused
    before that terabyte is allocated."""
    path = tmp_path / "s0.ck"
    _checkpoint_with(path, {"dict": [["w", {"array": "w"}]]},
                     {"w.npy": npy_header((1 << 40,), "|S0")})
    refused_within(MB, lambda: checkpoint.load(path),
                   match=r"declares shape \(1099511627776,\) of \|S1 \(1099511627776 bytes")
