"""Every sampling parameter's type, default, bounds and effect: the table SamplingParams
validates against and GET /v1/samplers serves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class SamplingParamError(ValueError):
    """A request parameter has the wrong type or an out-of-range value."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str                   # int | float | bool | str | int|null | list[...] | dict[...]
    default: Any
    effect: str
    low: float | None = None    # numeric bounds checked by validate()
    high: float | None = None
    low_open: bool = False      # True: the bound itself is excluded
    high_open: bool = False
    range_text: str | None = None   # overrides the text built from the bounds

    @property
    def range(self) -> str:
        if self.range_text is not None:
            return self.range_text
        if self.low is not None and self.high is not None:
            return (f"{'(' if self.low_open else '['}{_fmt(self.low)}, "
                    f"{_fmt(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        return "any"

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "default": self.default,
                "range": self.range, "effect": self.effect}

    def check(self, value: Any) -> None:
        base, nullable = self.type.removesuffix("|null"), self.type.endswith("|null")
        if value is None:
            if nullable:
                return
            raise SamplingParamError(self.name, f"must be {base}, not null")
        if base == "bool":
            if not isinstance(value, bool):
                raise SamplingParamError(self.name, "must be a boolean")
            return
        if base == "str":
            if not isinstance(value, str):
                raise SamplingParamError(self.name, "must be a string")
            return
        if base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SamplingParamError(self.name, "must be an integer")
        elif base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingParamError(self.name, "must be a number")
            if not math.isfinite(value):
                raise SamplingParamError(self.name, "must be finite")
        else:
            return                      # lists and dicts: checked by validate()
        too_low = self.low is not None and (value <= self.low if self.low_open
                                            else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open
                                              else value > self.high)
        if too_low or too_high:
            where = f"in {self.range}" if self.range[0] in "([" else self.range
            raise SamplingParamError(self.name, f"must be {where}, got {value!r}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


P = ParamSpec
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SAMPLER_SPECS: list[ParamSpec] = [
    P("n", "int", 1, "Number of completions to return for the prompt.", low=1),
    P("max_tokens", "int|null", 16, "Most tokens to generate; null means up to the context "
      "length.", low=1),
    P("min_tokens", "int", 0, "EOS and stop_token_ids are banned until this many tokens are "
      "generated.", low=0),
    P("stop", "list[str]", [], "Strings that end generation (matched on text); a single "
      "string is accepted.", range_text="non-empty strings"),
    P("stop_token_ids", "list[int]", [], "Token ids that end generation.",
      range_text="token ids in the vocabulary"),
    P("include_stop_str_in_output", "bool", False, "Keep the matched stop string in the "
      "output."),
    P("ignore_eos", "bool", False, "Keep generating after EOS."),
    P("seed", "int|null", None, "Seed for this request's random draws; the same seed gives the "
      "same tokens whatever else is batched. -1 means none.", low=INT64_MIN, high=INT64_MAX,
      range_text="64-bit integer or null"),
    P("logprobs", "int|null", None, "Return the sampled token's logprob and this many top "
      "alternatives.", low=0, range_text=">= 0, up to the server's --max-logprobs"),
    P("prompt_logprobs", "int|null", None, "Return logprobs of the prompt tokens with this many "
      "alternatives.", low=0, range_text=">= 0, up to the server's --max-logprobs"),
    P("logprobs_mode", "str", "raw", "'raw': log-softmax of the model's logits; 'processed': "
      "of the distribution actually sampled from.", range_text="raw | processed"),
    P("skip_special_tokens", "bool", True, "Drop special tokens from the output text."),
    P("spaces_between_special_tokens", "bool", True, "Put spaces around special tokens in "
      "the output text."),
    P("temperature", "float", 1.0, "Divides the logits; below 1e-5 the request is greedy.",
      low=0),
    P("dynatemp_min", "float", 0.0, "Dynamic temperature: when min or max is non-zero, "
      "T = min + (max - min) * (H / ln N) ^ exponent replaces temperature (H: entropy, N: "
      "tokens left).", low=0),
    P("dynatemp_max", "float", 0.0, "Upper end of the dynamic temperature range.", low=0),
    P("dynatemp_exponent", "float", 1.0, "Exponent on the normalised entropy in dynamic "
      "temperature.", low=0),
    P("temperature_last", "bool", False, "Apply temperature after XTC instead of before the "
      "filters (ignored with a custom sampler_priority)."),
    P("top_p", "float", 1.0, "Nucleus: keep the most likely tokens until their mass reaches "
      "top_p.", low=0, high=1, low_open=True),
    P("top_k", "int", 0, "Keep the k most likely tokens; 0 or -1 disables.", low=-1,
      range_text="-1, 0 (off) or >= 1"),
    P("top_a", "float", 0.0, "Remove tokens with p < top_a * p_max^2.", low=0, high=1),
    P("min_p", "float", 0.0, "Remove tokens with p < min_p * p_max.", low=0, high=1),
    P("tfs", "float", 1.0, "Tail-free sampling: cut where the cumulative normalised |second "
      "difference| of the sorted probabilities exceeds tfs.", low=0, high=1, low_open=True),
    P("eta_cutoff", "float", 0.0, "Eta sampling, in units of 1e-4: with eta = value * 1e-4, "
      "remove p < min(eta, sqrt(eta) * exp(-H)); the top token stays.", low=0, high=10000),
    P("epsilon_cutoff", "float", 0.0, "Epsilon sampling, in units of 1e-4: remove p < value * "
      "1e-4; the top token stays.", low=0, high=1000),
    P("typical_p", "float", 1.0, "Locally typical: keep the tokens whose surprise is closest to "
      "the entropy until their mass reaches typical_p.", low=0, high=1),
    P("smoothing_factor", "float", 0.0, "Quadratic smoothing: logit = max - k d^2 + s d^3 with "
      "d = logit - max, k = f (3 - c) / 2, s = f (c - 1) / 2.", low=0),
    P("smoothing_curve", "float", 1.0, "Curve c of quadratic smoothing; 1 is purely "
      "quadratic.", low=1),
    P("nsigma", "float", 0.0, "Top-n-sigma: remove logits below max - nsigma * std of the "
      "remaining logits.", low=0),
    P("xtc_threshold", "float", 0.1, "XTC: tokens with p >= threshold count as top choices.",
      low=0, high=1),
    P("xtc_probability", "float", 0.0, "XTC: chance per step to remove every top choice but the "
      "least likely one (when there are at least two).", low=0, high=1),
    P("skew", "float", 0.0, "After softmax, with the tokens sorted by probability: "
      "cdf <- cdf ^ exp(skew). Positive flattens towards unlikely tokens, negative sharpens.",
      low=-10, high=10),
    P("repetition_penalty", "float", 1.0, "Tokens in the prompt or output: positive logits are "
      "divided by it, negative ones multiplied.", low=0, low_open=True),
    P("repetition_penalty_range", "int", 0, "Only the last N tokens of prompt + output count "
      "for the repetition, frequency and presence penalties (frequency and presence still count "
      "only output tokens); 0 means the whole context.", low=0),
    P("frequency_penalty", "float", 0.0, "Subtract penalty * count of the token in the output.",
      low=-2, high=2),
    P("presence_penalty", "float", 0.0, "Subtract penalty once if the token is in the output.",
      low=-2, high=2),
    P("no_repeat_ngram_size", "int", 0, "Ban tokens that would repeat an n-gram of this size "
      "from the prompt or output; 0 disables.", low=0),
    P("dry_multiplier", "float", 0.0, "DRY: the token that would extend a repeated sequence of "
      "length L >= allowed_length gets logit -= multiplier * base ^ (L - allowed_length).",
      low=0),
    P("dry_base", "float", 1.75, "DRY: growth of the penalty with the repeat length.", low=1),
    P("dry_allowed_length", "int", 2, "DRY: longest repeat that is not penalised.", low=0),
    P("dry_sequence_breakers", "list[str]", ["\n", ":", "\"", "*"], "DRY: strings that end a "
      "repeat (the last token of each); a JSON array string is accepted.",
      range_text="non-empty strings"),
    P("dry_range", "int", 0, "DRY: look back this many tokens; 0 means the whole context.",
      low=0),
    P("mirostat_mode", "int", 0, "2 enables Mirostat v2: remove tokens whose surprise exceeds "
      "mu, then update mu from the sampled token.", range_text="0 or 2"),
    P("mirostat_tau", "float", 5.0, "Mirostat target surprise in bits; mu starts at 2 tau.",
      low=0),
    P("mirostat_eta", "float", 0.1, "Mirostat learning rate for mu.", low=0),
    P("logit_bias", "dict[int,float]", {}, "Added to the logits before every sampler; keys are "
      "token ids (strings accepted), values clamped to +-100.",
      range_text="token ids in the vocabulary -> numbers"),
    P("allowed_token_ids", "list[int]|null", None, "Only these tokens can be sampled.",
      range_text="non-empty, token ids in the vocabulary"),
    P("banned_token_ids", "list[int]", [], "These tokens are never sampled.",
      range_text="token ids in the vocabulary"),
    P("bad_words", "list[str]", [], "Words never generated: a word's last token is banned when "
      "the tokens before it match (with and without a leading space).",
      range_text="non-empty strings"),
    P("sampler_priority", "list[str|int]|null", None, "Custom order of the 14 reorderable "
      "stages, by name or Aphrodite SamplerID (top_p_top_k 0, top_a 1, min_p 2, tfs 3, "
      "typical_p 4, temperature 5, penalties 6, dry 7, no_repeat_ngram 8, top_nsigma 9, "
      "eta_cutoff 10, epsilon_cutoff 11, quadratic 12, xtc 13).", range_text="all 14 stages, each once"),
    P("structured_outputs", "dict|null", None, "Constrain the output to a JSON schema "
      "({\"json\": schema}), any JSON object ({\"json_object\": true}), a regular expression "
      "({\"regex\": ...}), one of several strings ({\"choice\": [...]}) or a Lark / GBNF "
      "grammar ({\"grammar\": ...}); optional whitespace_pattern or disable_any_whitespace "
      "for JSON. Disallowed tokens are masked before every other sampler; the request stops "
      "when the grammar is complete. The OpenAI fields response_format and guided_json, "
      "guided_regex, guided_choice, guided_grammar, guided_whitespace_pattern set it too.",
      range_text="exactly one of json, json_object, regex, choice, grammar"),
]
