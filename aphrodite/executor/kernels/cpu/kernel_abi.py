"""The C interface of the CPU kernels, written once: the entry points' prototypes, the
structures passed to them, and the constants both sides share, as C declarations.

Both sides are made from these tables. c_header() turns them into kernel_abi.h, which
build.py writes into each build's cache folder and cpu_kernels.cpp includes, so g++ rejects
an entry point whose definition has other types than its prototype (a conflicting
declaration of a C function) or that has no prototype here (-Werror=missing-declarations);
each structure in it is followed by static_asserts that its size and field offsets are the
ones ctypes gives it. bind() gives the loaded library's functions the same types for ctypes,
and fails on one it lacks; STRUCTURES are the structures' ctypes classes. A change on one
side alone thus fails the build or the load instead of corrupting memory
(tests/executor/kernels/test_kernel_abi.py).
"""

from __future__ import annotations

import ctypes
import re

HEADER = "kernel_abi.h"

# A KV cache's element type, as the kernels' enum KvDtype codes it.
KV_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

# Query heads per kv head that a prefill tile holds at least one token of
# (paged_prefill_attention.h's kTileRows, checked against this at compile time).
PREFILL_TILE_ROWS = 48

# Structures passed by pointer, each field "C type name"; a structure's members come first.
STRUCTS = {
    # Rows of a quantised matrix held as GGUF blocks of one type, row by row (see
    # quantized_linear.h).
    "MatrixSegment": ["const uint8_t* blocks", "int64_t rows", "int64_t ggml_type"],
    # One quantised matrix: up to three segments in row order (a stacked projection whose
    # parts have different types), the unused ones with 0 rows.
    "QuantizedMatrix": [
        "MatrixSegment part0", "MatrixSegment part1", "MatrixSegment part2",
        "const float* bias",             # [rows] or null
        "int64_t rows", "int64_t cols"],
    # One decoder layer's weights and KV cache (decode_layers.h). Null norms are left out.
    "DecodeLayerWeights": [
        "const float* input_norm",       # [hidden]
        "const float* post_norm",        # [hidden], before the MLP (Gemma: pre-feedforward)
        "const float* q_norm",           # [head_dim], on each q head before rotary, or null
        "const float* k_norm",           # [head_dim], on each k head before rotary, or null
        "const float* attn_out_norm",    # [hidden], on o_proj's output, or null
        "const float* mlp_out_norm",     # [hidden], on down_proj's output, or null
        "QuantizedMatrix qkv", "QuantizedMatrix o", "QuantizedMatrix gate_up",
        "QuantizedMatrix down",
        "void* kv_cache",                # [2, blocks, block_size, kv_heads, head_dim]
        "int64_t window",                # sliding window, 0: none
        "int64_t local_rope"],           # rotates by DecodeStep's local tables
    # What a decode step shares across layers. One new token per sequence: token t is
    # sequence t.
    "DecodeStep": [
        "float* hidden",                 # [tokens, hidden_size], the residual stream, in place
        "const float* cos",              # [tokens, head_dim]: the rotary tables' rows, sin's
        "const float* sin",              #   sign folded in (see layers/rotary.py)
        "const int64_t* slots",          # [tokens] cache slot of each new token, -1: not written
        "const int64_t* block_tables",   # [tokens, max_blocks]
        "const int64_t* seq_lens",       # [tokens], this step's token included
        "int64_t tokens", "int64_t hidden_size", "int64_t heads", "int64_t kv_heads",
        "int64_t head_dim", "int64_t block_size", "int64_t max_blocks",
        "int64_t cache_half",            # elements in one of a cache's key and value halves
        "int64_t kv_f16",                # the caches hold float16 (vec8.h's f16), not float32
        "float eps", "float scale",
        "const float* local_cos",        # [tokens, head_dim]: the tables of the layers with
        "const float* local_sin",        #   local_rope (Gemma 3's local base)
        "int64_t gelu",                  # the MLP's activation: tanh-GELU, else SiLU
        "float softcap"],                # attention scores' soft cap, 0: none
}

# The library's entry points (what each does: cpu_kernels.cpp, above its definition).
FUNCTIONS = [
    "int kv_float16_supported()",
    "void paged_decode_attention(const float* q, const void* k_cache, const void* v_cache, "
    "int kv_dtype, const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_lens, "
    "int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, "
    "float scale, int64_t window, float softcap, float* out)",
    "void paged_prefill_attention(const float* q, int64_t q_stride, const void* k_cache, "
    "const void* v_cache, int kv_f16, const int64_t* block_tables, int64_t max_blocks, "
    "const int64_t* seqs, int64_t num_seqs, int64_t heads, int64_t kv_heads, "
    "int64_t head_dim, int64_t block_size, float scale, int64_t window, float softcap, "
    "float* out)",
    "int quantized_linear(const float* x, int64_t tokens, int64_t cols, "
    "const uint8_t* weight, int ggml_type, int64_t rows, int64_t out_stride, float* out)",
    "int dequantize_blocks(const uint8_t* weight, int ggml_type, int64_t rows, int64_t cols, "
    "float* out)",
    "int amx_enable()",
    "int64_t amx_packed_size(int64_t rows, int64_t cols)",
    "void amx_pack(const uint8_t* weight, int64_t rows, int64_t cols, uint16_t* out)",
    "void amx_linear(const float* x, int64_t tokens, int64_t cols, const uint16_t* packed, "
    "int64_t rows, float* out)",
    "void decode_layers(const DecodeLayerWeights* layers, int64_t num_layers, "
    "const DecodeStep* step)",
    "void add_rms_norm(float* x, const float* delta, const float* weight, int64_t rows, "
    "int64_t size, float eps, float* out)",
    "void rotate_and_cache(float* qkv, const float* cos, const float* sin, "
    "const int64_t* slots, int64_t tokens, int64_t heads, int64_t kv_heads, "
    "int64_t head_dim, void* k_cache, void* v_cache, int kv_f16)",
    "void silu_and_mul(const float* gate_up, int64_t rows, int64_t inter, float* out)",
    "void gelu_tanh_and_mul(const float* gate_up, int64_t rows, int64_t inter, float* out)",
]

# How ctypes passes each C type that is not a pointer or a structure (pointers: c_void_p).
CTYPES = {"void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64,
          "float": ctypes.c_float}


def _declaration(text: str) -> tuple[str, str]:
    """Splits a declaration: 'const float* q' -> ('const float*', 'q')."""
    c_type, name = re.fullmatch(r"(.*\S)\s+(\w+)", text.strip()).groups()
    return c_type, name


def _prototype(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """A FUNCTIONS entry -> return type, name, [(argument type, argument name)]."""
    restype, name, arguments = re.fullmatch(r"(.*\S)\s+(\w+)\((.*)\)", text).groups()
    return restype, name, [_declaration(a) for a in arguments.split(",") if a.strip()]


def _ctype(c_type: str, structures: dict[str, type[ctypes.Structure]]):
    if c_type.endswith("*"):
        return ctypes.c_void_p
    return structures[c_type] if c_type in structures else CTYPES[c_type]


def structure_classes() -> dict[str, type[ctypes.Structure]]:
    """The ctypes classes of STRUCTS, as the tables read now."""
    classes: dict[str, type[ctypes.Structure]] = {}
    for name, fields in STRUCTS.items():
        classes[name] = type(name, (ctypes.Structure,), {"_fields_": [
            (field, _ctype(c_type, classes)) for c_type, field in map(_declaration, fields)]})
    return classes


STRUCTURES = structure_classes()


def c_header() -> str:
    """kernel_abi.h: the constants, the structures with their ctypes layout asserted, and the
    entry points' extern "C" prototypes."""
    lines = ["// Generated from aphrodite/executor/kernels/cpu/kernel_abi.py by build.py.",
             "#pragma once", "", "#include <cstddef>", "#include <cstdint>", "",
             "enum KvDtype { " + ", ".join(f"k{name.capitalize()} = {code}"
                                          for name, code in KV_DTYPE_CODES.items()) + " };",
             f"constexpr int64_t kPrefillTileRows = {PREFILL_TILE_ROWS};", ""]
    for name, cls in structure_classes().items():
        lines += [f"struct {name} {{", *(f"    {field};" for field in STRUCTS[name]), "};",
                  f'static_assert(sizeof({name}) == {ctypes.sizeof(cls)}, '
                  f'"{name}: ctypes\' size");']
        lines += [f'static_assert(offsetof({name}, {field}) == {getattr(cls, field).offset}, '
                  f'"{name}.{field}: ctypes\' offset");' for field, _ in cls._fields_]
        lines.append("")
    lines += ['extern "C" {', *(f"{prototype};" for prototype in FUNCTIONS), "}", ""]
    return "\n".join(lines)


def bind(library: ctypes.CDLL) -> None:
    """Sets argtypes and restype of each entry point; OSError if the library lacks one."""
    for prototype in FUNCTIONS:
        restype, name, arguments = _prototype(prototype)
        try:
            function = getattr(library, name)
        except AttributeError:
            raise OSError(f"{library._name} has no {name}, which kernel_abi.py declares") from None
        function.restype = _ctype(restype, STRUCTURES)
        function.argtypes = [_ctype(c_type, STRUCTURES) for c_type, _ in arguments]
