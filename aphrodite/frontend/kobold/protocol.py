"""Request bodies of the KoboldAI API (/api/v1, /api/latest, /api/extra) as pydantic models.

Kobold clients (SillyTavern, Kobold Lite) are looser with types than OpenAI's SDKs, so the
models validate in pydantic's lax mode ("0.7" and 40.0 are accepted). Unknown fields are
kept (extra="allow") for mapping.py to warn about once; how each field maps onto
SamplingParams is mapping.py's table.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from aphrodite.frontend.openai_protocol import ErrorDetail


class _KoboldBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class KoboldGenerateRequest(_KoboldBody):
    """POST /api/v1/generate and /api/extra/generate/stream."""
    prompt: str
    max_context_length: Optional[int] = Field(None, description=(
        "The client's context size: the prompt is cut from the left to the last "
        "max_context_length - max_length tokens (the model's context length if larger or "
        "absent)."))
    max_length: Optional[int] = Field(None, description="Most tokens to generate (max_tokens).")
    genkey: Optional[str] = Field(None, description=(
        "Names the generation for /api/extra/generate/check and /api/extra/abort."))
    memory: Optional[str] = Field(None, description=(
        "Text put before the prompt and kept when the prompt is cut to fit."))
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    top_a: Optional[float] = None
    min_p: Optional[float] = None
    typical: Optional[float] = None
    tfs: Optional[float] = None
    nsigma: Optional[float] = None
    eps_cutoff: Optional[float] = None
    eta_cutoff: Optional[float] = None
    rep_pen: Optional[float] = None
    rep_pen_range: Optional[int] = None
    rep_pen_slope: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    sampler_order: Optional[list[int]] = Field(None, description=(
        "Kobold sampler ids in the order to apply them: 0 top-k, 1 top-a, 2 top-p (with "
        "min-p), 3 tail-free, 4 typical, 5 temperature, 6 repetition penalty."))
    sampler_seed: Optional[int] = None
    stop_sequence: Optional[list[str]] = None
    trim_stop: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    singleline: Optional[bool] = None
    dynatemp_range: Optional[float] = None
    dynatemp_exponent: Optional[float] = None
    smoothing_factor: Optional[float] = None
    smoothing_curve: Optional[float] = None
    xtc_threshold: Optional[float] = None
    xtc_probability: Optional[float] = None
    dry_multiplier: Optional[float] = None
    dry_base: Optional[float] = None
    dry_allowed_length: Optional[int] = None
    dry_penalty_last_n: Optional[int] = None
    dry_sequence_breakers: Union[list[str], str, None] = None
    mirostat: Optional[int] = None
    mirostat_tau: Optional[float] = None
    mirostat_eta: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    banned_tokens: Optional[list[str]] = None
    custom_token_bans: Union[list[int], str, None] = None
    grammar: Optional[str] = None
    grammar_retain_state: Optional[bool] = None
    ignore_eos: Optional[bool] = None
    bypass_eos: Optional[bool] = None
    use_default_badwordsids: Optional[bool] = None
    render_special: Optional[bool] = None
    quiet: Optional[bool] = None
    images: Optional[list[Any]] = None
    soft_prompt: Optional[str] = None
    use_story: Optional[bool] = None
    use_memory: Optional[bool] = None
    use_authors_note: Optional[bool] = None
    use_world_info: Optional[bool] = None


class KoboldTokenCountRequest(_KoboldBody):
    """POST /api/extra/tokencount."""
    prompt: str
    special: bool = Field(True, description="Count the tokens the tokenizer adds (BOS), as "
                          "the generate routes do.")


class KoboldGenkeyRequest(_KoboldBody):
    """POST /api/extra/generate/check and /api/extra/abort; the body may be empty."""
    genkey: Optional[str] = None


class KoboldErrorDetail(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    msg: str
    type: str


class KoboldErrorResponse(BaseModel):
    """The body of a 4xx/5xx answer on /api routes: OpenAI's error object, and `detail` as
    KoboldCpp sends it (SillyTavern shows detail.msg)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    error: ErrorDetail
    detail: Optional[KoboldErrorDetail] = None
