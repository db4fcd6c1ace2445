"""Engine configuration: one flat dataclass that crosses process boundaries as a dict."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str | None = None            # HF folder, .gguf file or hub id; None = bundled default
    tokenizer: str | None = None        # defaults to the model's own tokenizer
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    quantization: str = "auto"          # auto | none | int4: GGUF weights kept quantised on CPU
    device: str = "auto"                # auto | cpu | cuda
    max_model_len: int | None = None    # defaults to the model's max positions
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool on CPU; None = a share of free RAM
    kv_cache_dtype: str = "auto"        # auto (the model's dtype) | float16 (CPU: half the bytes)
    gpu_memory_utilization: float = 0.90
    num_kv_blocks: int | None = None    # overrides the memory-based pool size (tests)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    num_threads: int | None = None      # torch threads in each worker; None = cores / workers
    seed: int = 0
    max_logprobs: int = 20
    worker_timeout_s: float = float(os.environ.get("APHRODITE_ENGINE_ITERATION_TIMEOUT_S", 60))
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TypeError(f"unknown engine options: {sorted(unknown)}")
        return cls(**data)

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto or float16, got {self.kv_cache_dtype!r}")
        if self.quantization not in ("auto", "none", "int4"):
            raise ValueError(f"quantization must be auto, none or int4, got {self.quantization!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
