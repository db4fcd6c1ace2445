"""The kernels' C interface is written once (kernels/cpu/kernel_abi.py): a table that
disagrees with the C++ definitions, or a ctypes layout that disagrees with g++'s, fails the
build or the load instead of passing arguments the kernels misread."""

import ctypes
import logging
import subprocess

import pytest

from aphrodite.executor.kernels.cpu import build, kernel_abi
from aphrodite.executor.kernels.cpu import ops as cpu_kernels


@pytest.fixture
def checked_build(tmp_path, monkeypatch, cpp_compiler):
    """build.build in a private cache, compiling with -fsyntax-only: g++ checks the sources
    against kernel_abi.h as in a real build, without generating code."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path))
    flags = build.flags
    monkeypatch.setattr(build, "flags", lambda arch: [*flags(arch), "-fsyntax-only"])
    return lambda: build.build(build.find_compiler())


def replace_function(monkeypatch, name: str, prototype: str | None) -> None:
    """FUNCTIONS with `name`'s prototype replaced (None: left out)."""
    functions = [prototype if kernel_abi._prototype(p)[1] == name else p
                 for p in kernel_abi.FUNCTIONS]
    monkeypatch.setattr(kernel_abi, "FUNCTIONS", [p for p in functions if p is not None])


def test_the_header_declares_every_entry_point_and_structure():
    header = kernel_abi.c_header()
    for prototype in kernel_abi.FUNCTIONS:
        assert f"{prototype};" in header
    for name, fields in kernel_abi.STRUCTS.items():
        assert f"struct {name} {{\n" + "".join(f"    {f};\n" for f in fields) + "};" in header
    assert "enum KvDtype { kFloat32 = 0, kBfloat16 = 1, kFloat16 = 2 };" in header


def test_the_structures_keep_the_field_order_callers_construct_them_in():
    """The fused decode step (executor/models/) builds MatrixSegment, QuantizedMatrix and
    DecodeStep from positional arguments."""
    assert [name for name, _ in cpu_kernels.MatrixSegment._fields_] == [
        "blocks", "rows", "ggml_type"]
    assert [name for name, _ in cpu_kernels.QuantizedMatrix._fields_] == [
        "part0", "part1", "part2", "bias", "rows", "cols"]
    assert [name for name, _ in cpu_kernels.DecodeStep._fields_] == [
        "hidden", "cos", "sin", "slots", "block_tables", "seq_lens", "tokens", "hidden_size",
        "heads", "kv_heads", "head_dim", "block_size", "max_blocks", "cache_half", "kv_f16",
        "eps", "scale", "local_cos", "local_sin", "gelu", "softcap"]
    assert cpu_kernels.DecodeStep.eps.offset == 15 * 8
    assert cpu_kernels.DecodeStep.local_cos.offset == 16 * 8
    assert ctypes.sizeof(cpu_kernels.QuantizedMatrix) == 3 * 3 * 8 + 3 * 8
    assert ctypes.sizeof(cpu_kernels.DecodeLayerWeights) == 9 * 8 + 4 * ctypes.sizeof(
        cpu_kernels.QuantizedMatrix)


def test_an_argument_type_that_differs_from_the_definition_fails_to_compile(
        checked_build, monkeypatch):
    replace_function(monkeypatch, "quantized_linear",
                     "int quantized_linear(const float* x, int64_t tokens, int64_t cols, "
                     "const uint8_t* weight, int64_t ggml_type, int64_t rows, "
                     "int64_t out_stride, float* out)")
    with pytest.raises(subprocess.CalledProcessError) as failure:
        checked_build()
    assert "conflicting declaration of C function" in failure.value.stderr
    assert "quantized_linear" in failure.value.stderr


def test_an_entry_point_missing_from_the_table_fails_to_compile(checked_build, monkeypatch):
    replace_function(monkeypatch, "silu_and_mul", None)
    with pytest.raises(subprocess.CalledProcessError) as failure:
        checked_build()
    assert "no previous declaration" in failure.value.stderr
    assert "silu_and_mul" in failure.value.stderr


def test_a_ctypes_layout_that_differs_from_the_compilers_fails_to_compile(
        checked_build, monkeypatch):
    monkeypatch.setitem(kernel_abi.CTYPES, "int64_t", ctypes.c_int32)
    with pytest.raises(subprocess.CalledProcessError) as failure:
        checked_build()
    assert "static assertion failed" in failure.value.stderr
    assert "QuantizedMatrix: ctypes' size" in failure.value.stderr


def test_an_entry_point_the_library_lacks_fails_the_load(monkeypatch, cpp_compiler):
    # A CDLL object of its own: the types set here are not ops.py's.
    library = ctypes.CDLL(str(build.build(build.find_compiler())))
    kernel_abi.bind(library)
    monkeypatch.setattr(kernel_abi, "FUNCTIONS",
                        [*kernel_abi.FUNCTIONS, "void no_such_kernel(float* out)"])
    with pytest.raises(OSError, match="no_such_kernel"):
        kernel_abi.bind(library)


def test_a_library_that_fails_to_bind_leaves_the_torch_paths(monkeypatch, caplog, cpp_compiler):
    def fail(library):
        raise OSError("cpu_kernels.so has no no_such_kernel, which kernel_abi.py declares")

    monkeypatch.setattr(kernel_abi, "bind", fail)
    with caplog.at_level(logging.WARNING, logger="aphrodite.worker"):
        assert build.load_library() is None
    assert "no_such_kernel" in caplog.text and "torch path" in caplog.text
