"""A Kobold generate body onto SamplingParams: the one table of what each Kobold field means
here, the sampler_order ids, and fitting the prompt into the client's context.

Choices where Kobold servers differ (../shared/research/surface.md, section 1):
- temperature 0 is greedy (Aphrodite's Kobold route turned it into 1).
- use_default_badwordsids and bypass_eos ban the EOS tokens, as KoboldCpp and the KoboldAI
  spec do (not Aphrodite's ban of every token containing a bracket).
- Stop sequences are cut from the text, as on the OpenAI routes; trim_stop false or
  include_stop_str_in_output true keeps them.
- rep_pen_range is honoured (repetition_penalty_range); rep_pen_slope is not, and says so
  once in the log when it would matter.
- banned_tokens (KoboldCpp's banned phrases) become bad_words: a phrase's last token is banned
  after the tokens before it; custom_token_bans (ids, a list or "1,2,3") become
  banned_token_ids.
"""

from __future__ import annotations

import logging
from typing import Any

from aphrodite.frontend.kobold.protocol import KoboldGenerateRequest
from aphrodite.sampler_specs import SamplingParamError
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplerStage, parse_sampler_stage
from aphrodite.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("aphrodite.server")

DEFAULT_MAX_LENGTH = 180     # KoboldCpp's max_length when a request leaves it out

# Kobold field -> SamplingParams field, where the value carries over as it is.
RENAMED = {
    "n": "n", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
    "top_a": "top_a", "min_p": "min_p", "typical": "typical_p", "tfs": "tfs",
    "nsigma": "nsigma", "eps_cutoff": "epsilon_cutoff", "eta_cutoff": "eta_cutoff",
    "rep_pen": "repetition_penalty", "rep_pen_range": "repetition_penalty_range",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "sampler_seed": "seed", "stop_sequence": "stop",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "dynatemp_exponent": "dynatemp_exponent", "smoothing_factor": "smoothing_factor",
    "smoothing_curve": "smoothing_curve", "xtc_threshold": "xtc_threshold",
    "xtc_probability": "xtc_probability", "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
    "dry_penalty_last_n": "dry_range", "dry_sequence_breakers": "dry_sequence_breakers",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "logit_bias": "logit_bias", "ignore_eos": "ignore_eos", "banned_tokens": "bad_words",
}
# Fields with their own rule in sampling_fields() (or read by the serving code).
CONVERTED = {"prompt", "memory", "genkey", "max_context_length", "max_length", "sampler_order",
             "rep_pen_slope", "trim_stop", "singleline", "dynatemp_range", "mirostat",
             "custom_token_bans", "grammar", "bypass_eos", "use_default_badwordsids",
             "render_special", "images"}
# Features of KoboldAI's own story editor or log: clients send them off on every request.
IGNORED_WHEN_OFF = {"use_story", "use_memory", "use_authors_note", "use_world_info",
                    "grammar_retain_state", "soft_prompt"}
IGNORED = {"quiet"}          # only quietens KoboldCpp's own console
# Kobold ids (KoboldCpp's enum samplers) by the stage names parse_sampler_stage knows.
KOBOLD_SAMPLER_IDS = {0: "top_k", 1: "top_a", 2: "top_p", 3: "tfs", 4: "typical",
                      5: "temperature", 6: "rep_pen"}
_SAMPLING_TO_KOBOLD = {target: name for name, target in RENAMED.items()}
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("KoboldAI API: %s", message)


def kobold_param(sampling_name: str | None) -> str | None:
    """The Kobold name of a SamplingParams field, for error messages."""
    if sampling_name is None:
        return None
    return _SAMPLING_TO_KOBOLD.get(sampling_name, sampling_name)


def sampling_fields(body: KoboldGenerateRequest, max_length: int,
                    eos_token_ids: list[int]) -> dict[str, Any]:
    """SamplingParams keyword arguments for the body (the prompt aside). Raises
    SamplingParamError naming the Kobold field for what cannot be honoured."""
    sent = {name: value for name, value in body.model_dump(exclude_unset=True).items()
            if value is not None}
    fields: dict[str, Any] = {"max_tokens": max_length}
    for name, value in sent.items():
        if name in RENAMED:
            fields[RENAMED[name]] = value
        elif name in IGNORED_WHEN_OFF:
            if value not in (False, ""):
                warn_once(name, f"{name} is not supported and is ignored")
        elif name not in CONVERTED and name not in IGNORED:
            warn_once(name, f"the field {name} is not supported and is ignored")
    if sent.get("images"):
        raise SamplingParamError("images", "images are not supported by this server")
    if sent.get("trim_stop") is False:
        fields["include_stop_str_in_output"] = True
    if sent.get("singleline"):
        fields["stop"] = [*fields.get("stop", []), "\n"]
    if sent.get("render_special"):
        fields["skip_special_tokens"] = False
    if sent.get("use_default_badwordsids") or sent.get("bypass_eos"):
        fields["banned_token_ids"] = list(eos_token_ids)
    if "custom_token_bans" in sent:
        fields["banned_token_ids"] = [*fields.get("banned_token_ids", []),
                                      *_token_ids(sent["custom_token_bans"])]
    mirostat = sent.get("mirostat", 0)
    if mirostat not in (0, 2):
        raise SamplingParamError("mirostat", "must be 0 (off) or 2 (Mirostat v2); v1 is not "
                                 "supported")
    fields["mirostat_mode"] = mirostat
    if sent.get("dynatemp_range"):
        spread = sent["dynatemp_range"]
        temperature = fields.get("temperature", 1.0)
        fields["dynatemp_min"] = max(0.0, temperature - spread)
        fields["dynatemp_max"] = max(0.0, temperature + spread)
    slope = sent.get("rep_pen_slope")
    if (slope not in (None, 0, 1) and fields.get("repetition_penalty_range", 0) > 0
            and fields.get("repetition_penalty", 1) != 1):
        warn_once("rep_pen_slope", "rep_pen_slope is ignored: the repetition penalty applies "
                  "in full to every token of rep_pen_range")
    grammar = sent.get("grammar")
    if grammar is not None and grammar.strip():
        fields["structured_outputs"] = StructuredOutputsParams(grammar=grammar)
    if "sampler_order" in sent:
        fields["sampler_priority"] = kobold_sampler_priority(sent["sampler_order"],
                                                             fields.get("top_p", 1.0))
    return fields


def kobold_sampler_priority(order: list[int], top_p: float = 1.0) -> list[str]:
    """All 14 stages for a Kobold sampler_order: the stages it names take the slots the
    default order gives them, in the client's order; the others keep their places.

    Kobold's top-k (0) and top-p (2) are one stage here: it stands where top-p does (top-k
    keeps the k most likely tokens wherever it runs among stages that keep the most likely
    tokens), or where top-k does when top_p is off. Min-p moves with top-p, as in KoboldCpp."""
    if len(set(order)) != len(order):
        raise SamplingParamError("sampler_order", "must not repeat a sampler id")
    unknown = [i for i in order if i not in KOBOLD_SAMPLER_IDS]
    if unknown:
        raise SamplingParamError("sampler_order", f"unknown Kobold sampler id {unknown[0]} "
                                 "(0 top-k, 1 top-a, 2 top-p, 3 tfs, 4 typical, 5 temperature, "
                                 "6 repetition penalty)")
    fused_at = 2 if 2 in order and (top_p < 1 or 0 not in order) else 0
    stages: list[SamplerStage] = []
    for kobold_id in order:
        if kobold_id not in (0, 2) or kobold_id == fused_at:
            stages.append(parse_sampler_stage(KOBOLD_SAMPLER_IDS[kobold_id]))
        if kobold_id == 2:
            stages.append(SamplerStage.MIN_P)
    result = list(DEFAULT_SAMPLER_ORDER)
    slots = sorted(result.index(stage) for stage in stages)
    for slot, stage in zip(slots, stages):
        result[slot] = stage
    return [stage.name.lower() for stage in result]


def context_size(max_context_length: int | None, max_model_len: int) -> int:
    """The client's context size, at most the model's."""
    if max_context_length is None:
        return max_model_len
    if max_context_length < 1:
        raise SamplingParamError("max_context_length", "must be at least 1")
    if max_context_length > max_model_len:
        warn_once("max_context_length", f"max_context_length {max_context_length} is larger "
                  f"than the model's context ({max_model_len} tokens); prompts are fitted into "
                  f"{max_model_len}")
        return max_model_len
    return max_context_length


def generation_length(max_length: int | None, context: int,
                      server_default: int | None = None) -> int:
    """max_length, or when it is left out the server's --default-max-tokens (else
    KoboldCpp's 180), leaving at least one token of the context for the prompt."""
    if max_length is None:
        return max(1, min(server_default or DEFAULT_MAX_LENGTH, context - 1))
    if max_length < 1:
        raise SamplingParamError("max_length", "must be at least 1")
    if max_length > context:
        raise SamplingParamError("max_length", f"is {max_length}, more than the context of "
                                 f"{context} tokens (max_context_length)")
    return max_length


def fit_prompt(special: list[int], memory: list[int], prompt: list[int],
               budget: int) -> list[int]:
    """special + memory + the end of prompt, cut from the left to ``budget`` tokens (at least
    one): the tokenizer's leading special tokens and the memory go only when nothing of the
    prompt is left."""
    budget = max(1, budget)
    room = budget - len(special) - len(memory)
    kept = prompt[len(prompt) - room:] if room > 0 else []
    return (special + memory + kept)[-budget:]


def _token_ids(value: Any) -> list[int]:
    if isinstance(value, str):   # SillyTavern's text-completion form: "12, 345"
        try:
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise SamplingParamError("custom_token_bans", "must be token ids, as a list or "
                                     "comma-separated") from None
    return list(value)
