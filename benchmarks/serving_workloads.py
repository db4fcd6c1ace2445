"""Seeded request lists for the serving benchmark: fixed, mixed, shared-prefix, long and
prompt512 (one stream: TTFT of a 512-token prompt, then decode).

Prompts are text made of whole-word vocabulary tokens (" apple", " river", ...: GPT-2 style
"Ġapple" or SentencePiece "▁apple"), so every server, ours or not, tokenises them back to
exactly the intended token count (plus a BOS where the tokenizer adds one): the same requests
go to every backend as plain OpenAI /v1/completions bodies.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass


@dataclass
class Request:
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class WorkloadSpec:
    name: str
    input_len: tuple[int, int]          # unique prompt tokens per request, inclusive range
    output_len: tuple[int, int]         # new tokens per request (ignore_eos), inclusive range
    levels: list[int]                   # concurrency levels
    shared_prefix_len: int = 0          # one system prompt in front of every request
    about: str = ""


def default_specs(levels: list[int], scale: float = 1.0) -> dict[str, WorkloadSpec]:
    # The default model's context is 8k: the long mix stays well inside it with its output.
    capped = lambda cap: sorted({min(c, cap) for c in levels})   # prefill-heavy: fewer at once
    specs = {
        "fixed": WorkloadSpec("fixed", (128, 128), (64, 64), levels,
                              about="128 prompt tokens, 64 new tokens each"),
        "mixed": WorkloadSpec("mixed", (16, 512), (16, 256), levels,
                              about="prompts 16-512, outputs 16-256 tokens, seeded uniform"),
        "shared-prefix": WorkloadSpec("shared-prefix", (16, 64), (32, 32), capped(16),
                                      shared_prefix_len=1024,
                                      about="one 1024-token system prompt + 16-64 own tokens, "
                                            "32 new tokens"),
        "long": WorkloadSpec("long", (1024, 4096), (32, 32), capped(8),
                             about="prompts 1024-4096 tokens, 32 new tokens"),
        # One request at a time whatever --levels says: TTFT and decode speed of one stream.
        "prompt512": WorkloadSpec("prompt512", (512, 512), (128, 128), [1],
                                  about="one stream: 512 prompt tokens, 128 new tokens"),
    }
    if scale != 1.0:
        size = lambda n: max(1, round(n * scale))
        for spec in specs.values():
            spec.input_len = (size(spec.input_len[0]), size(spec.input_len[1]))
            spec.output_len = (max(2, size(spec.output_len[0])), max(2, size(spec.output_len[1])))
            spec.shared_prefix_len = size(spec.shared_prefix_len) if spec.shared_prefix_len else 0
            spec.about += f" (lengths scaled by {scale})"
    return specs


class WordSource:
    """Text whose token count is known: each word is one vocabulary token with its space."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.words = sorted({t[1:] for t in vocab if re.fullmatch(r"[Ġ▁][a-z]{3,10}", t)})
        if len(self.words) < 1000:
            raise RuntimeError("tokenizer has no GPT-2 or SentencePiece style word tokens; "
                               "cannot build prompts")

    def text(self, rng: random.Random, n_tokens: int) -> str:
        return "".join(" " + rng.choice(self.words) for _ in range(n_tokens))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def level_requests(spec: WorkloadSpec, words: WordSource, concurrency: int, n: int,
                   seed: int) -> list[Request]:
    """The n requests for one (workload, concurrency) run, the same for every backend.

    Each level gets its own prompts (seeded by workload and level) so a prefix cache never
    serves one level's prompts from an earlier level; only the shared system prompt repeats.
    """
    rng = random.Random(zlib.crc32(f"{seed}/{spec.name}/{concurrency}".encode()))
    prefix = ""
    if spec.shared_prefix_len:
        prefix = words.text(random.Random(zlib.crc32(f"{seed}/{spec.name}/prefix".encode())),
                            spec.shared_prefix_len)
    requests = []
    for _ in range(n):
        text = prefix + words.text(rng, rng.randint(*spec.input_len))
        requests.append(Request(text, words.count(text), rng.randint(*spec.output_len)))
    return requests


def warmup_requests(words: WordSource, seed: int) -> list[Request]:
    rng = random.Random(zlib.crc32(f"{seed}/warmup".encode()))
    return [Request(t, words.count(t), 4) for t in (words.text(rng, 24) for _ in range(2))]
