"""Structured outputs in the engine core: compiled grammars and each step's token masks.

Grammars compile on one background thread, so the step loop never waits for one: the
tokenizer (the JSON the frontend wrote to ``<session_dir>/tokenizer.json``, see
EngineProcess.share_tokenizer) loads there on the first structured request, and each
distinct constraint compiles once into a pristine llguidance matcher (LRU-bounded); every
request gets its own deep copy. A constraint that does not compile fails that request
alone. Torch-free: llguidance and numpy only.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from aphrodite.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("aphrodite.engine")

TOKENIZER_FILE = "tokenizer.json"
MAX_CACHED_GRAMMARS = 256


class GrammarCompileError(ValueError):
    """The request's constraint cannot become a grammar for this tokenizer."""


class GrammarManager:
    def __init__(self, session_dir: str, vocab_size: int, eos_token_ids: list[int],
                 max_cached: int = MAX_CACHED_GRAMMARS):
        self.tokenizer_path = os.path.join(session_dir, TOKENIZER_FILE)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_cached = max_cached
        self.mask_words = (vocab_size + 31) // 32
        # Touched by the compile thread only.
        self._tokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")

    def submit(self, structured_outputs: dict) -> Future:
        """Compile in the background; the future's result is a fresh matcher of its own."""
        return self._pool.submit(self._matcher_for, structured_outputs)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- compile thread -----------------------------------------------------------------
    def _matcher_for(self, structured_outputs: dict):
        from llguidance import LLMatcher

        try:
            params = StructuredOutputsParams.from_dict(structured_outputs)
            key = params.cache_key()
            pristine = self._compiled.get(key)
            if pristine is None:
                grammar = params.grammar_text()
                pristine = LLMatcher(self._load_tokenizer(), grammar, log_level=0)
                if pristine.is_error():
                    raise GrammarCompileError(pristine.get_error().strip())
                self._compiled[key] = pristine
                while len(self._compiled) > self.max_cached:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
            return pristine.deep_copy()
        except GrammarCompileError:
            raise
        except Exception as exc:     # llguidance and the schema converters raise plain ones
            raise GrammarCompileError(str(exc) or type(exc).__name__) from exc

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from llguidance import LLTokenizer
            try:
                with open(self.tokenizer_path, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise GrammarCompileError("the frontend has not shared the tokenizer "
                                          f"({self.tokenizer_path} is missing)") from None
            self._tokenizer = LLTokenizer(text, n_vocab=self.vocab_size,
                                          eos_token=self.eos_token_ids)
        return self._tokenizer

    # ---- step loop ------------------------------------------------------------------------
    def fill_masks(self, matchers: list) -> np.ndarray:
        """One int32 bitmask row per matcher (bit k of word w allows token 32w + k)."""
        from llguidance.numpy import fill_next_token_bitmask

        bitmask = np.empty((len(matchers), self.mask_words), dtype=np.int32)
        for row, matcher in enumerate(matchers):
            fill_next_token_bitmask(matcher, bitmask, row)
        return bitmask


def resolve_grammar(req, future: Future) -> None:
    """Give a request whose compile finished its matcher, or fail it (400, structured_outputs)."""
    req.awaiting_grammar = False
    try:
        matcher = future.result()
    except GrammarCompileError as exc:
        req.fail(f"The grammar for structured_outputs does not compile for this model: {exc}",
                 status=400, param="structured_outputs")
        return
    except Exception as exc:          # a bug: still only this request fails
        logger.exception("grammar compile failed")
        req.fail(f"compiling the grammar failed: {exc}", status=500)
        return
    if matcher.is_stopped():          # a grammar that only admits the empty text
        req.finish("stop")
        return
    req.matcher = matcher
