"""Launch sizes of the CUDA launchers, checked against a stand-in device (no GPU needed)."""

import sys
import types

import pytest

from gpunn import cuda

H100 = {"MultiProcessorCount": 132, "MaxRegistersPerMultiprocessor": 65536,
        "MaxThreadsPerMultiProcessor": 2048, "MaxBlocksPerMultiprocessor": 32}


@pytest.fixture
def fake_h100(monkeypatch):
    device = types.SimpleNamespace(id=0, attributes=H100)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda *a: device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cuda._blocks_per_sm.cache_clear()
    yield
    cuda._blocks_per_sm.cache_clear()


@pytest.mark.parametrize("regs, block, per_sm", [
    (32, 256, 8),     # threads and registers both allow 8 blocks of 256
    (39, 256, 6),     # 39 registers round up to 40 per thread (1280 per warp): 6 blocks
    (64, 1024, 1),    # a 1024-thread softmax block at 64 registers fills the SM
    (16, 32, 32),     # tiny blocks: the block-count limit
])
def test_grid_is_one_full_wave(fake_h100, regs, block, per_sm):
    kernel = types.SimpleNamespace(num_regs=regs)
    assert cuda.grid_for(10**9, block, kernel) == 132 * per_sm
    assert cuda.grid_for(5 * block, block, kernel) == 5  # fewer when the work needs fewer
    assert cuda.grid_for(0, block, kernel) == 1


def test_family_constants_become_a_constexpr_prelude():
    family = cuda.Family("test_constants", [], {"BLOCK": 256, "CHUNK": 1 << 40, "FLAG": True,
                                                "SCALE": 0.1})
    try:
        prelude = family.prelude()
        for line in ("constexpr int BLOCK = 256;", "constexpr long long CHUNK = 1099511627776;",
                     "constexpr bool FLAG = true;", "constexpr double SCALE = 0.1;"):
            assert line in prelude
        assert prelude.index("namespace gpunn {") < prelude.index("BLOCK")
        assert cuda.Family("test_none", []).prelude() == ""
        with pytest.raises(TypeError, match="constant NAME: expected a bool, int or float"):
            cuda.cpp_constant("NAME", "256")
    finally:
        cuda.FAMILIES.pop("test_constants")
        cuda.FAMILIES.pop("test_none")
