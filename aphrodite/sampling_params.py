"""Sampling parameters: one request's generation and sampler settings, validated in one place.

This module is imported by the frontend and the engine core, so it never imports torch.

The greedy rule: a request is greedy when ``temperature < 1e-5`` and dynamic temperature is
off (dynatemp replaces the static temperature, so its value no longer matters). A greedy
request takes the argmax after the stages that change *which* token is best: logit_bias,
allowed/banned tokens, bad words, the min_tokens EOS ban, DRY, the penalties and
no-repeat-ngram. Every other stage (temperature, the truncation filters, smoothing, XTC,
skew, mirostat) is skipped for it: the filters keep the argmax anyway, and XTC, skew and
mirostat only make sense for random sampling. Processed logprobs of a greedy request are the
log-softmax of the logits it took the argmax of.

Cutoff units: ``eta_cutoff`` and ``epsilon_cutoff`` are in units of 1e-4 (3 means a
probability of 3e-4), as Aphrodite documents them and as SillyTavern and Kobold clients send
them. Aphrodite 0.6 compared the raw value against probabilities, so the usual client value 3
left only the argmax; we scale on purpose.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

from aphrodite.sampler_specs import SAMPLER_SPECS, SamplingParamError
from aphrodite.structured_outputs import StructuredOutputsParams

GREEDY_TEMPERATURE = 1e-5        # temperature below this means greedy
CUTOFF_UNIT = 1e-4               # eta_cutoff / epsilon_cutoff are given in these units
LOGIT_BIAS_LIMIT = 100.0         # logit_bias values are clamped to +-this


class SamplerStage(enum.IntEnum):
    """Reorderable sampler stages; the values are Aphrodite's SamplerID numbers. Kobold's
    sampler_order ids differ (its 2 is top-p): the Kobold routes map theirs by name."""
    TOP_P_TOP_K = 0
    TOP_A = 1
    MIN_P = 2
    TFS = 3
    TYPICAL_P = 4
    TEMPERATURE = 5
    PENALTIES = 6
    DRY = 7
    NO_REPEAT_NGRAM = 8
    TOP_NSIGMA = 9
    ETA_CUTOFF = 10
    EPSILON_CUTOFF = 11
    QUADRATIC = 12
    XTC = 13


S = SamplerStage
DEFAULT_SAMPLER_ORDER: tuple[SamplerStage, ...] = (
    S.DRY, S.PENALTIES, S.NO_REPEAT_NGRAM, S.TEMPERATURE, S.TOP_NSIGMA, S.TOP_P_TOP_K,
    S.TOP_A, S.MIN_P, S.TFS, S.ETA_CUTOFF, S.EPSILON_CUTOFF, S.TYPICAL_P, S.QUADRATIC, S.XTC)
TEMPERATURE_LAST_ORDER: tuple[SamplerStage, ...] = tuple(
    s for s in DEFAULT_SAMPLER_ORDER if s is not S.TEMPERATURE) + (S.TEMPERATURE,)

# Names accepted in sampler_priority besides the canonical ones (lower-cased enum names).
_STAGE_ALIASES = {
    "top_k": S.TOP_P_TOP_K, "top_p": S.TOP_P_TOP_K, "topk": S.TOP_P_TOP_K, "topp": S.TOP_P_TOP_K,
    "temp": S.TEMPERATURE, "typical": S.TYPICAL_P, "rep_pen": S.PENALTIES,
    "repetition_penalty": S.PENALTIES, "ngram": S.NO_REPEAT_NGRAM, "nsigma": S.TOP_NSIGMA,
    "eta": S.ETA_CUTOFF, "epsilon": S.EPSILON_CUTOFF, "eps": S.EPSILON_CUTOFF,
    "smoothing": S.QUADRATIC, "smoothing_factor": S.QUADRATIC,
}


def parse_sampler_stage(value: Any) -> SamplerStage:
    """A stage from its SamplerID number (int or digit string) or a name (any case, some
    aliases)."""
    if isinstance(value, bool):
        raise ValueError(f"not a sampler stage: {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        return SamplerStage(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _STAGE_ALIASES:
            return _STAGE_ALIASES[key]
        return SamplerStage[key.upper()]
    raise ValueError(f"not a sampler stage: {value!r}")


@dataclass
class SamplingParams:
    # ---- generation control (the engine core reads these) ----
    n: int = 1
    max_tokens: int | None = 16          # None: up to the model's context length
    min_tokens: int = 0                  # EOS and stop_token_ids are banned until reached
    stop: list[str] = field(default_factory=list)    # a single str is accepted
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None              # -1 means None
    logprobs: int | None = None          # top-N logprobs per sampled token (0: only the token)
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"           # raw: the model's log-softmax; processed: after samplers
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # ---- samplers (effects: aphrodite/sampler_specs.py) ----
    temperature: float = 1.0
    dynatemp_min: float = 0.0
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    temperature_last: bool = False
    top_p: float = 1.0
    top_k: int = 0                       # 0 and -1 disable
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 1.0
    eta_cutoff: float = 0.0              # units of 1e-4 (CUTOFF_UNIT)
    epsilon_cutoff: float = 0.0          # units of 1e-4 (CUTOFF_UNIT)
    typical_p: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    nsigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    skew: float = 0.0
    repetition_penalty: float = 1.0
    repetition_penalty_range: int = 0    # only the last N tokens count as seen; 0: all
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", "\"", "*"])
    dry_range: int = 0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)   # str keys are accepted
    allowed_token_ids: list[int] | None = None
    banned_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    sampler_priority: list[str | int] | None = None
    # ---- constrained decoding (a dict is accepted; aphrodite/structured_outputs.py) ----
    structured_outputs: StructuredOutputsParams | None = None
    # ---- resolved from the strings above by the frontend (resolve_token_strings) ----
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    dry_sequence_breaker_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._normalise()
        self.validate()

    # ---- derived views used by the sampler ----
    @property
    def uses_dynatemp(self) -> bool:
        return self.dynatemp_min != 0 or self.dynatemp_max != 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE and not self.uses_dynatemp

    def sampler_order(self) -> tuple[SamplerStage, ...]:
        """The stage order for this request. A custom sampler_priority wins over
        temperature_last (as in Aphrodite 0.6); temperature_last moves temperature after XTC."""
        if self.sampler_priority is not None:
            return tuple(parse_sampler_stage(s) for s in self.sampler_priority)
        return TEMPERATURE_LAST_ORDER if self.temperature_last else DEFAULT_SAMPLER_ORDER

    # ---- serialisation (plain JSON-able dicts for orjson frames) ----
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        for name in ("stop", "stop_token_ids", "dry_sequence_breakers", "banned_token_ids",
                     "bad_words", "dry_sequence_breaker_ids", "allowed_token_ids",
                     "sampler_priority"):
            if data[name] is not None:
                data[name] = list(data[name])
        data["bad_words_token_ids"] = [list(ids) for ids in self.bad_words_token_ids]
        if self.structured_outputs is not None:
            data["structured_outputs"] = self.structured_outputs.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise SamplingParamError(key, "unknown sampling parameter")
        return cls(**data)

    # ---- token strings -> ids (frontend, which owns the tokenizer) ----
    def resolve_token_strings(self, tokenizer) -> None:
        """Fill dry_sequence_breaker_ids and bad_words_token_ids with a transformers tokenizer.

        A DRY breaker is the last token of encode("a" + s): the "a" keeps tokenizers that add a
        leading-space marker from changing how s itself is split. A bad word is banned both as
        written and with a leading space, since the two usually tokenise differently."""
        if self.dry_multiplier > 0:
            ids = set()
            for text in self.dry_sequence_breakers:
                encoded = tokenizer.encode("a" + text, add_special_tokens=False)
                if encoded:
                    ids.add(encoded[-1])
            self.dry_sequence_breaker_ids = sorted(ids)
        sequences: list[list[int]] = []
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                encoded = list(tokenizer.encode(text, add_special_tokens=False))
                if encoded and encoded not in sequences:
                    sequences.append(encoded)
        self.bad_words_token_ids = sequences

    # ---- normalisation and validation ----
    def _normalise(self) -> None:
        """Accept the lenient input forms clients send, turning them into the canonical ones."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.dry_sequence_breakers is None:
            self.dry_sequence_breakers = ["\n", ":", "\"", "*"]
        elif isinstance(self.dry_sequence_breakers, str):
            # Kobold/ST completions may send the list as a JSON string.
            try:
                self.dry_sequence_breakers = json.loads(self.dry_sequence_breakers)
            except ValueError:
                raise SamplingParamError("dry_sequence_breakers",
                                         "must be a list of strings or a JSON array") from None
        for name in ("stop_token_ids", "banned_token_ids", "bad_words", "bad_words_token_ids",
                     "dry_sequence_breaker_ids"):
            if getattr(self, name) is None:
                setattr(self, name, [])
        if self.seed == -1:
            self.seed = None
        for spec in SAMPLER_SPECS:      # JSON clients sometimes send 40.0 for an int
            value = getattr(self, spec.name)
            if spec.type.startswith("int") and isinstance(value, float) and value.is_integer():
                setattr(self, spec.name, int(value))
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.sampler_priority is not None:
            self.sampler_priority = _normalise_priority(self.sampler_priority)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    def validate(self, vocab_size: int | None = None, max_logprobs: int | None = None) -> None:
        """Check every parameter's type and range; raise SamplingParamError naming the first bad
        one. With vocab_size, token ids are also checked against the vocabulary."""
        for spec in SAMPLER_SPECS:
            spec.check(getattr(self, spec.name))
        if self.mirostat_mode not in (0, 2):
            raise SamplingParamError("mirostat_mode", "must be 0 (off) or 2")
        if self.logprobs_mode not in ("raw", "processed"):
            raise SamplingParamError("logprobs_mode", "must be 'raw' or 'processed'")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError("min_tokens", "must not exceed max_tokens")
        if self.uses_dynatemp and self.dynatemp_min > self.dynatemp_max:
            raise SamplingParamError("dynatemp_min", "must not exceed dynatemp_max")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and max_logprobs is not None and value > max_logprobs:
                raise SamplingParamError(name, f"must be <= {max_logprobs}")
        _check_strings("stop", self.stop, allow_empty_items=False)
        _check_strings("bad_words", self.bad_words, allow_empty_items=False)
        _check_strings("dry_sequence_breakers", self.dry_sequence_breakers,
                       allow_empty_items=False)
        for name in ("stop_token_ids", "banned_token_ids", "dry_sequence_breaker_ids"):
            _check_token_ids(name, getattr(self, name), vocab_size)
        if self.allowed_token_ids is not None:
            _check_token_ids("allowed_token_ids", self.allowed_token_ids, vocab_size)
            if not self.allowed_token_ids:
                raise SamplingParamError("allowed_token_ids", "must not be empty")
        if not isinstance(self.bad_words_token_ids, list):
            raise SamplingParamError("bad_words_token_ids", "must be a list of token id lists")
        for ids in self.bad_words_token_ids:
            _check_token_ids("bad_words_token_ids", ids, vocab_size)
        _check_token_ids("logit_bias", list(self.logit_bias), vocab_size)


def _check_strings(param: str, values: Any, allow_empty_items: bool) -> None:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SamplingParamError(param, "must be a list of strings")
    if not allow_empty_items and any(v == "" for v in values):
        raise SamplingParamError(param, "must not contain empty strings")


def _check_token_ids(param: str, ids: Any, vocab_size: int | None) -> None:
    if not isinstance(ids, list):
        raise SamplingParamError(param, "must be a list of token ids")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise SamplingParamError(param, f"token ids must be integers, got {token!r}")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise SamplingParamError(param, f"token id {token} is not in {limit}")


def _normalise_logit_bias(bias: Any) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise SamplingParamError("logit_bias", "must be an object of token id -> bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key) if not isinstance(key, bool) else None
        except (TypeError, ValueError):
            token = None
        if token is None or (isinstance(key, float) and not key.is_integer()):
            raise SamplingParamError("logit_bias", f"key {key!r} is not a token id")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise SamplingParamError("logit_bias", f"bias for token {key} must be a finite number")
        out[token] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
    return out


def _normalise_priority(priority: Any) -> list[str]:
    if not isinstance(priority, (list, tuple)):
        raise SamplingParamError("sampler_priority", "must be a list of sampler names or ids")
    stages = []
    for item in priority:
        try:
            stages.append(parse_sampler_stage(item))
        except (KeyError, ValueError):
            raise SamplingParamError("sampler_priority",
                                     f"unknown sampler {item!r}") from None
    if len(set(stages)) != len(stages) or set(stages) != set(SamplerStage):
        missing = sorted(s.name.lower() for s in set(SamplerStage) - set(stages))
        raise SamplingParamError("sampler_priority", "must list each of the 14 stages exactly "
                                 f"once; missing: {missing}" if missing else
                                 "must list each of the 14 stages exactly once; got duplicates")
    return [s.name.lower() for s in stages]
