"""Weight-only quantised execution (GGUF Q4_0/Q4_1 as int4, Q8_0 as int8 groups) and the
converted-weights cache.

References are independent: gguf's own dequantize for the block formats, float64 matmuls of the
dequantised matrices for the kernels, the float32 (dequantised) model for greedy agreement.
"""

import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aphrodite.config import EngineConfig
from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.kernels.cpu import ops as cpu_kernels
from aphrodite.executor.layers import linear
from aphrodite.executor.layers.linear import quantized_weight
from aphrodite.executor.layers.quantized import QuantizedWeight, parts_from_gguf
from aphrodite.executor.loader import converted_cache, iter_weights, load_model_weights
from aphrodite.executor.loader import gguf as gguf_loader
from aphrodite.executor.loader import quantization
from aphrodite.executor.loader.converted_cache import load_gguf_converted
from aphrodite.executor.loader.quantization import quantized_types
from aphrodite.executor.models import get_model_class
from aphrodite.gguf_reader import GGUFTensors
from aphrodite.model_files import gguf_weights_cache_path, load_config, load_tokenizer, resolve_model

torch.set_num_threads(1)
Q = gguf.GGMLQuantizationType


def quantized_matrix(kind, rows=96, cols=192, seed=0):
    rng = np.random.default_rng(seed)
    # Per-row offsets and outliers make the per-block minimums and scales differ.
    values = (rng.standard_normal((rows, cols)) * 0.1 + rng.standard_normal((rows, 1)) * 0.05)
    values[rng.random(values.shape) < 0.01] *= 8
    raw = gguf.quants.quantize(values.astype(np.float32), kind)
    return raw, gguf.quants.dequantize(raw, kind).reshape(rows, cols)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_parts_dequantize_like_gguf(kind):
    raw, reference = quantized_matrix(kind)
    parts = parts_from_gguf(raw, kind, reference.shape)
    np.testing.assert_array_equal(parts.dequantize(), reference)
    # The C++ kernel's blocks are GGUF's own (Q4_0 rewritten as Q4_1)
    blocks = parts.blocks
    as_gguf = Q.Q8_0 if kind == Q.Q8_0 else Q.Q4_1
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, as_gguf).reshape(reference.shape),
                                  reference)
    if kind != Q.Q4_0:
        np.testing.assert_array_equal(blocks.reshape(-1), raw.reshape(-1))


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_kernel_dequantisation_is_ggufs_bit_for_bit(kind, cpp_compiler):
    """The float32 copy `auto` keeps and the kernel's widened panels share this code: its
    matrix must be gguf's own, bit for bit."""
    raw, reference = quantized_matrix(kind, rows=40, cols=256, seed=3)
    blocks = torch.from_numpy(np.ascontiguousarray(parts_from_gguf(raw, kind, reference.shape).blocks))
    out = cpu_kernels.dequantize_blocks(blocks, Q.Q8_0 if kind == Q.Q8_0 else Q.Q4_1,
                                       reference.shape[1])
    np.testing.assert_array_equal(out.numpy(), reference)


@pytest.fixture(params=["kernel", "torch"])
def kernel_path(request, monkeypatch):
    """QuantizedWeight's two paths: the C++ kernel, or torch's int4 kernel (no compiler)."""
    if request.param == "kernel":
        request.getfixturevalue("cpp_compiler")
    else:
        monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    return request.param


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("tokens", [1, 5, 8, 13, 64])
def test_quantized_linear_matches_dequantized_matmul(kind, tokens, kernel_path):
    raw, _ = quantized_matrix(kind, seed=tokens)
    parts = parts_from_gguf(raw, kind, (96, 192))
    if kernel_path == "torch" and kind == Q.Q8_0:   # the loader dequantises it instead
        with pytest.raises(ValueError, match="only Q4_0/Q4_1"):
            quantized_weight(parts)
        return
    weight = quantized_weight(parts)
    assert (weight.blocks is not None) == (kernel_path == "kernel")
    bias = torch.randn(96)
    x = torch.randn(tokens, 192)
    expected = (x.double() @ torch.from_numpy(parts.dequantize()).double().T + bias.double())
    out = linear.linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (tokens, 96)
    if kernel_path == "kernel" or tokens > linear.TORCH_INT4_DENSE_ABOVE_TOKENS:
        # float32 activations against the dequantised matrix: rounding order only
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        # torch's int4 kernel rounds activations to bfloat16: about 2^-9 relative per element.
        rel = (out.double() - expected).norm() / expected.norm()
        assert 1e-5 < rel < 6e-3
    # embedding rows are exact and read alone
    ids = torch.tensor([[0, 95], [7, 7]])
    dense = torch.from_numpy(parts.dequantize())
    weight.dequantize = None   # the lookup must not build the whole matrix
    assert torch.equal(F.embedding(ids, weight), dense[ids])
    del weight.dequantize
    # anything else sees the dense matrix, F.linear included
    assert torch.equal(weight.sum(), dense.sum())
    assert torch.equal(F.linear(x, weight, bias), F.linear(x, dense, bias))


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_panels_cover_every_row_and_token(kind, threads, cpp_compiler):
    """From 8 tokens on the kernel widens panels of 24 rows and multiplies them in tiles of 6
    rows x 16 tokens (with AVX-512, 12, 4 or 1 rows x 32 or 16 tokens first, zero-padded, over
    columns in chunks of 128), transposing tokens and results 8 x 8 at a time: row, column and
    token counts that leave partial panels, tiles, chunks and transposition blocks must still
    give every output (against a float64 product of gguf's matrix)."""
    raw, reference = quantized_matrix(kind, rows=103, cols=288, seed=threads)
    blocks = torch.from_numpy(np.ascontiguousarray(parts_from_gguf(raw, kind, reference.shape).blocks))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for tokens in (7, 8, 9, 16, 17, 21, 33, 40, 49, 56, 64, 70):
            x = torch.randn(tokens, 288)
            out = cpu_kernels.quantized_linear(x, blocks, Q.Q8_0 if kind == Q.Q8_0 else Q.Q4_1)
            expected = x.double() @ torch.from_numpy(reference).double().T
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def amx(cpp_compiler):
    if not cpu_kernels.amx_available():
        pytest.skip("no AMX tiles on this CPU, or not granted by the OS")


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_amx_product_is_float32_accurate(kind, threads, amx):
    """Prefill's AMX product (kernels/amx_linear.h) against a float64 product of gguf's
    matrix. It sums x * d * q and sum(x) * m apart, as the decode kernel does, so its error
    scale is sum |x| * (|d * q| + |m|); each output is within 2e-7 of that (measured: at most
    8.6e-8; float32 GEMM on the dequantised matrix: 1.5e-7). With 64 columns, leaving out an
    activation's third bfloat16 part alone would be off by 4.2e-7 to 1.4e-6; a weight's
    second part or a wrong min by far more. 1,088 columns take two steps of mins, the second
    partly filled; token counts leave partial tiles; the threads (5: more than output
    tile pairs) split the products."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, cols in ((64, 64), (96, 1088)):
            raw, reference = quantized_matrix(kind, rows=rows, cols=cols, seed=threads)
            parts = parts_from_gguf(raw, kind, reference.shape)
            packed = cpu_kernels.amx_pack(torch.from_numpy(parts.blocks), cols)
            weight = torch.from_numpy(reference).double()
            scaled = parts.codes.reshape(rows, -1, 32) * parts.scales[..., None]
            magnitude = torch.from_numpy(
                (np.abs(scaled) + np.abs(parts.mins[..., None])).reshape(rows, cols)).double()
            for tokens in (1, 17, 32, 129, 300):
                x = torch.randn(tokens, cols)
                out = cpu_kernels.amx_linear(x, packed, rows)
                assert out.shape == (tokens, rows) and out.is_contiguous()
                error = (out.double() - x.double() @ weight.T).abs()
                bound = 2e-7 * (x.double().abs() @ magnitude.T)
                assert bool((error <= bound).all()), \
                    f"{rows}x{cols}, {tokens} tokens: {(error / bound).max().item() * 2e-7:.2e}"
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# The default model: quantised vs dequantised float32

def build(files, quantization):
    config = load_config(files)
    model = get_model_class(config)(config, torch.float32)
    if quantization == "none":   # the plain streaming loader: dequantised float32
        model.load_weights(iter_weights(files, progress=False))
    else:
        load_model_weights(model, files, EngineConfig(quantization=quantization), "cpu",
                           progress=False)
    return model.eval()


@torch.inference_mode()
def next_token_argmax(model, tokens):
    """Greedy choice after every prefix of `tokens`, in one prefill."""
    blocks = -(-len(tokens) // 16)
    caches = allocate_kv_caches(model.config.num_hidden_layers, blocks, 16, model.num_kv_heads,
                                model.head_dim, torch.float32, "cpu")
    meta = AttentionMetadata.build(np.array([len(tokens)]), np.array([len(tokens)]),
                                   np.arange(blocks)[None], np.arange(len(tokens)),
                                   AttentionConfig.for_cache(
                                       caches[0], model.config.num_attention_heads, model.dtype))
    hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta)
    return model.compute_logits(hidden).argmax(-1)


CHATS = [
    ("What is the capital of France?", "The capital of France is Paris, a city known for the "
     "Eiffel Tower, its museums such as the Louvre, and its cafes along the Seine river."),
    ("Write a short poem about the sea.", "The sea is wide and deep and blue,\nits waves roll in "
     "and out anew;\nbeneath the moon the waters sigh,\nand seabirds wheel across the sky."),
    ("Explain what a hash table is.", "A hash table stores key-value pairs. A hash function turns "
     "each key into an index in an array, so lookups, inserts and deletes take constant time on "
     "average, even with many entries."),
    ("Give me three tips for studying.", "1. Study in short sessions with breaks.\n2. Remove "
     "distractions such as your phone.\n3. Test yourself instead of only rereading your notes."),
]


def test_default_model_quantized_agrees_with_float(monkeypatch):
    """Teacher-forced over 4 chats (prompt + answer, about 70 positions each): the quantised
    model's greedy token equals the float model's at nearly every position.
    Uses the normal cache folder, like the server: the converted tokenizer is usually there."""
    # Every position through the int4 kernel, as in single-token decode steps (each output row
    # depends on its input row only), instead of the dense path long prefills take.
    monkeypatch.setattr(linear, "DENSE_ABOVE_TOKENS", 1 << 30)
    monkeypatch.setattr(linear, "TORCH_INT4_DENSE_ABOVE_TOKENS", 1 << 30)
    files = resolve_model(None)
    tokenizer = load_tokenizer(files)
    dense, quantized = build(files, "none"), build(files, "int4")
    layer = quantized.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.weight, QuantizedWeight)
    assert isinstance(layer.mlp.gate_up_proj.weight, QuantizedWeight)
    assert not isinstance(dense.layers[0].mlp.down_proj.weight, QuantizedWeight)
    kernel = cpu_kernels.library_available()
    # The Q8_0 embedding (also the output matrix) stays quantised with the C++ kernel.
    assert isinstance(quantized.embed_tokens, QuantizedWeight) == kernel
    assert quantized.lm_head is None or not kernel
    agree = total = 0
    for question, answer in CHATS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=False)
        tokens = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        a, b = next_token_argmax(dense, tokens), next_token_argmax(quantized, tokens)
        agree += int((a == b).sum())
        total += len(tokens)
    print(f"teacher-forced greedy agreement {agree}/{total}")
    # The C++ kernel keeps activations in float32 (ties aside, the same argmax); torch's int4
    # kernel rounds them to bfloat16.
    assert agree / total >= (0.99 if kernel else 0.95), f"{agree}/{total}"


def test_quantization_modes(cpp_compiler, monkeypatch):
    files = resolve_model(None)
    config = load_config(files)
    model = get_model_class(config)(config, torch.float32)

    def mode(device="cpu", **options):
        return quantization.quantization_mode(EngineConfig(**options), files, device, model)
    assert mode() == "int4+dense"
    assert mode(quantization="int4") == "int4"
    assert mode(quantization="none") == "none"
    assert mode("cuda") == "none"
    # A float32 copy that would take the weights past half the free memory is not made.
    usage = quantization.footprint(files.gguf_path, quantized_types())
    assert usage.kept_weights > 0 and usage.total("int4") < usage.total("int4+dense")
    assert usage.total("none") == 4 * sum(int(np.prod(t.shape)) for t in
                                          GGUFTensors(files.gguf_path).tensors)
    monkeypatch.setattr(quantization, "available_ram",
                        lambda: int(usage.total("int4+dense") / quantization.DENSE_COPY_MAX_SHARE))
    assert mode() == "int4+dense"
    monkeypatch.setattr(quantization, "available_ram",
                        lambda: int(usage.total("int4+dense") / quantization.DENSE_COPY_MAX_SHARE) - 1)
    assert mode() == "int4"
    # Files too big to convert in one piece choose the same way (they stream instead).
    monkeypatch.setattr(converted_cache, "DENSE_CACHE_MAX_FILE", 1 << 20)
    assert mode() == "int4"
    # Without the C++ kernels auto stays float32 (torch's int4 kernel is not worth it).
    monkeypatch.setattr(cpu_kernels, "library_available", lambda: False)
    assert mode() == "none"
    assert mode(quantization="int4") == "int4"


def test_start_up_log_names_the_mode_the_reason_and_the_bytes(cpp_compiler, monkeypatch, caplog):
    files = resolve_model(None)
    config = load_config(files)
    model = get_model_class(config)(config, torch.float32)
    monkeypatch.setattr(quantization, "available_ram", lambda: 100 << 20)
    with caplog.at_level("INFO", logger=quantization.logger.name):
        assert quantization.quantization_mode(EngineConfig(), files, "cpu", model) == "int4"
    usage = quantization.footprint(files.gguf_path, quantized_types())
    assert (f"--quantization auto -> int4 (a float32 copy for long calls would take the "
            f"weights to {usage.total('int4+dense') / 2**30:.2f} GiB") in caplog.text
    assert f"{usage.total('int4') / 2**30:.2f} GiB once loaded, 0.10 GiB" in caplog.text
    assert "Dequantised to float32" not in caplog.text   # Q4_1 and Q8_0 have kernels
    # A type without a kernel (here: Q8_0, as where torch's int4 kernel stands in) is named.
    monkeypatch.setattr(quantization, "quantized_types", lambda: quantization.INT4_TYPES)
    caplog.clear()
    with caplog.at_level("INFO", logger=quantization.logger.name):
        quantization.quantization_mode(EngineConfig(quantization="int4"), files, "cpu", model)
    assert "no kernel keeps these GGUF types quantised: Q8_0 (1 tensors)" in caplog.text


def test_files_too_big_for_the_cache_stream_into_the_model(tmp_path, monkeypatch, cpp_compiler):
    """Quantised loading without the converted-weights cache (files over its size limit):
    the same weights, and no cache entry written."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    files = resolve_model(None)
    cached = build(files, "int4")
    monkeypatch.setattr(converted_cache, "DENSE_CACHE_MAX_FILE", 1 << 20)
    shutil.rmtree(tmp_path / "cache" / "weights", ignore_errors=True)
    streamed = build(files, "int4")
    assert not (tmp_path / "cache" / "weights").exists()
    for a, b in [(cached.embed_tokens, streamed.embed_tokens),
                 (cached.layers[2].self_attn.qkv_proj.weight,
                  streamed.layers[2].self_attn.qkv_proj.weight),
                 (cached.layers[5].mlp.down_proj.weight, streamed.layers[5].mlp.down_proj.weight)]:
        assert isinstance(b, QuantizedWeight)
        assert torch.equal(a.blocks, b.blocks)


@torch.inference_mode()
def test_auto_holds_both_and_picks_per_call(cpp_compiler):
    """auto: quantised blocks for a few tokens, the float32 copy (equal to the dequantised
    matrix) above DENSE_ABOVE_TOKENS, or AMX tiles above AMX_ABOVE_TOKENS; the same numbers
    each way up to rounding order."""
    files = resolve_model(None)
    model = build(files, "auto")
    weight = model.layers[3].mlp.down_proj.weight
    # int4 matrices hold AMX operand tiles instead of the float32 copy where the CPU has AMX.
    amx = cpu_kernels.amx_available()
    assert isinstance(weight, QuantizedWeight) and (weight.amx is not None) == amx
    assert (weight.dense is not None) == (not amx)
    assert isinstance(model.embed_tokens, QuantizedWeight) and model.embed_tokens.dense is not None
    for tokens in (1, 40, linear.AMX_ABOVE_TOKENS + 1, linear.DENSE_ABOVE_TOKENS + 1):
        x = torch.randn(tokens, weight.in_features)
        expected = x.double() @ weight.dequantize().double().T
        torch.testing.assert_close(linear.linear(x, weight).double(), expected, rtol=1e-4,
                                   atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Converted-weights cache

def test_second_load_reads_the_cache_and_a_changed_file_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    model_file = tmp_path / "model.gguf"
    shutil.copyfile(resolve_model(None).gguf_path, model_file)
    files = resolve_model(str(model_file))
    first = load_gguf_converted(files, quantized_types(), progress=False)
    path = gguf_weights_cache_path(files, converted_cache.cache_variant(quantized_types()))
    assert path.is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted although a cache entry exists")
    monkeypatch.setattr(gguf_loader, "iter_gguf", no_conversion)
    second = load_gguf_converted(files, quantized_types(), progress=False)
    assert first.keys() == second.keys()
    name = "model.layers.2.self_attn.q_proj.weight"
    np.testing.assert_array_equal(first[name].codes, second[name].codes)
    np.testing.assert_array_equal(first[name].mins, second[name].mins)
    torch.testing.assert_close(first["model.norm.weight"], second["model.norm.weight"])
    embedding = "model.embed_tokens.weight"   # Q8_0: quantised when the C++ kernel builds
    np.testing.assert_array_equal(np.asarray(getattr(first[embedding], "codes", first[embedding])),
                                  np.asarray(getattr(second[embedding], "codes", second[embedding])))

    # Touching the file changes the key: the old entry is not used.
    os.utime(model_file, ns=(1, 1))
    with pytest.raises(AssertionError, match="converted although"):
        load_gguf_converted(files, quantized_types(), progress=False)


def test_corrupt_cache_entry_falls_back_to_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    files = resolve_model(None)
    path = gguf_weights_cache_path(files, converted_cache.cache_variant(quantized_types()))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    tensors = load_gguf_converted(files, quantized_types(), progress=False)
    reference = dict(gguf_loader.iter_gguf(files.gguf_path, False, quantized_types()))
    name = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(tensors[name].codes, reference[name].codes)
    # and the entry was rewritten with good content
    again = load_gguf_converted(files, quantized_types(), progress=False)
    np.testing.assert_array_equal(again[name].codes, reference[name].codes)
