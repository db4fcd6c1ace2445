"""Building, caching and falling back from the CPU C++ kernels (kernels/cpu/build.py).

The kernels' numbers are checked against dense references in tests/executor/layers/."""

import logging
import os

import numpy as np
import pytest
import torch

from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers.attention import AttentionConfig, AttentionMetadata


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A private cache folder, and the loader's memo cleared before and after."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    cpu_kernels._library.cache_clear()


def decode_metadata():
    return AttentionMetadata.build(np.array([1, 1]), np.array([5, 9]),
                                   np.array([[0, 1, 0], [2, 3, 4]]), np.array([4, 16]),
                                   AttentionConfig("cpu", torch.float32, torch.float32, 4, 2, 16,
                                                   block_size=4))


def test_built_once_then_loaded_from_the_cache(fresh_build, cpp_compiler):
    assert cpu_kernels.library_available()
    built = list((fresh_build / "kernels").glob("*/cpu_kernels.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernels._library.cache_clear()          # a new process, as far as the loader knows
    assert cpu_kernels.library_available()
    assert list((fresh_build / "kernels").glob("*/cpu_kernels.so")) == built
    assert built[0].stat().st_mtime_ns == stamp   # not compiled again
    assert decode_metadata().decode_backend == "cpu"


@pytest.mark.parametrize("compiler", ["/nonexistent/g++", "false"])
def test_without_a_working_compiler_the_torch_path_runs(fresh_build, monkeypatch, caplog,
                                                        compiler):
    monkeypatch.setenv("CXX", compiler)
    with caplog.at_level(logging.WARNING, logger="aphrodite.worker"):
        assert not cpu_kernels.library_available()
    assert "torch path" in caplog.text
    meta = decode_metadata()
    assert meta.decode_backend == "torch_grouped" and meta.decode_plan is not None
    assert not (fresh_build / "kernels").exists() or not os.listdir(fresh_build / "kernels")


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("APHRODITE_CPU_KERNELS", "0")
    assert not cpu_kernels.library_available()
    assert decode_metadata().decode_plan is not None
