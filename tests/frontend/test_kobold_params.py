"""The Kobold generate body onto SamplingParams (aphrodite/frontend/kobold/mapping.py): the
table, sampler_order ids, grammar, stop sequences and fitting the prompt into the context."""

import dataclasses
import logging

import pytest

from aphrodite.frontend.kobold import mapping
from aphrodite.frontend.kobold.protocol import KoboldGenerateRequest
from aphrodite.frontend.structured_request import check_structured_outputs
from aphrodite.sampler_specs import SamplingParamError
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplerStage, SamplingParams

EOS = [2, 7]
# A valid, non-default value for every field that carries over as it is.
RENAMED_VALUES = {
    "n": 3, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "top_a": 0.2, "min_p": 0.05,
    "typical": 0.95, "tfs": 0.97, "nsigma": 1.5, "eps_cutoff": 3.0, "eta_cutoff": 4.0,
    "rep_pen": 1.1, "rep_pen_range": 320, "presence_penalty": 0.3, "frequency_penalty": 0.2,
    "sampler_seed": 1234, "stop_sequence": ["\nUser:"], "include_stop_str_in_output": True,
    "dynatemp_exponent": 1.5, "smoothing_factor": 0.3, "smoothing_curve": 1.5,
    "xtc_threshold": 0.2, "xtc_probability": 0.5, "dry_multiplier": 0.8, "dry_base": 1.5,
    "dry_allowed_length": 3, "dry_penalty_last_n": 512, "dry_sequence_breakers": ["\n", "!"],
    "mirostat_tau": 4.0, "mirostat_eta": 0.2, "logit_bias": {"5": -3.0}, "ignore_eos": True,
    "banned_tokens": ["dragon"],
}


def params_for(**body) -> SamplingParams:
    request = KoboldGenerateRequest.model_validate({"prompt": "Once", **body})
    return SamplingParams(**mapping.sampling_fields(request, body.get("max_length", 16), EOS))


def test_every_field_has_a_rule():
    """No Kobold field falls through unmapped: each is renamed, converted or ignored."""
    known = (set(mapping.RENAMED) | mapping.CONVERTED | mapping.IGNORED_WHEN_OFF
             | mapping.IGNORED)
    assert set(KoboldGenerateRequest.model_fields) == known
    sampling_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(mapping.RENAMED.values()) <= sampling_fields
    assert set(RENAMED_VALUES) == set(mapping.RENAMED)


def test_renamed_fields_reach_sampling_params():
    params = params_for(**RENAMED_VALUES)
    for kobold_name, value in RENAMED_VALUES.items():
        target = mapping.RENAMED[kobold_name]
        expected = {5: -3.0} if target == "logit_bias" else value
        assert getattr(params, target) == expected, kobold_name
        assert getattr(params, target) != getattr(SamplingParams(), target), kobold_name


def test_converted_fields():
    params = params_for(max_length=50, stop_sequence=["END"], singleline=True, trim_stop=False,
                        use_default_badwordsids=True, custom_token_bans="11, 12",
                        mirostat=2, dynatemp_range=0.4, temperature=0.9, render_special=True)
    assert params.max_tokens == 50
    assert params.stop == ["END", "\n"] and params.include_stop_str_in_output
    assert params.banned_token_ids == [*EOS, 11, 12]
    assert params.mirostat_mode == 2 and not params.skip_special_tokens
    assert params.dynatemp_min == pytest.approx(0.5) and params.dynatemp_max == pytest.approx(1.3)
    assert params_for(temperature=0).is_greedy             # 0 is greedy, not 1
    assert params_for(sampler_seed=-1).seed is None
    assert params_for(custom_token_bans=[4, 9]).banned_token_ids == [4, 9]
    assert params_for(dynatemp_range=2.0, temperature=0.5).dynatemp_min == 0.0


@pytest.mark.parametrize("body, param", [
    ({"mirostat": 1}, "mirostat"), ({"images": ["abc"]}, "images"),
    ({"sampler_order": [0, 1, 7]}, "sampler_order"), ({"sampler_order": [0, 0]}, "sampler_order"),
    ({"custom_token_bans": "1,x"}, "custom_token_bans")])
def test_what_cannot_be_honoured_is_an_error(body, param):
    with pytest.raises(SamplingParamError) as err:
        params_for(**body)
    assert err.value.param == param


def test_kobold_name_in_sampling_errors():
    with pytest.raises(SamplingParamError) as err:
        params_for(rep_pen=0)
    assert mapping.kobold_param(err.value.param) == "rep_pen"


def test_ignored_fields_warn_once_when_on(caplog):
    mapping._warned.clear()
    with caplog.at_level(logging.WARNING, logger="aphrodite.server"):
        params_for(use_story=False, use_memory=False, quiet=True, rep_pen_slope=0.9)
        assert not caplog.records     # sent routinely and off: nothing to say
        for _ in range(2):
            params_for(use_world_info=True, rep_pen=1.2, rep_pen_range=64, rep_pen_slope=0.7,
                       frmttriminc=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert any("use_world_info" in m for m in messages)
    assert any("rep_pen_slope is ignored" in m for m in messages)
    assert any("frmttriminc" in m for m in messages)


# ---- sampler_order ----------------------------------------------------------------------

def kobold_relative_order(priority: list[str]) -> list[str]:
    named = {"top_p_top_k", "top_a", "min_p", "tfs", "typical_p", "temperature", "penalties"}
    return [name for name in priority if name in named]


def test_koboldcpp_order_with_top_p_on():
    priority = mapping.kobold_sampler_priority([6, 0, 1, 3, 4, 2, 5], top_p=0.9)
    # top-k fused with top-p where top-p stands; min-p right after it, as KoboldCpp does
    assert kobold_relative_order(priority) == ["penalties", "top_a", "tfs", "typical_p",
                                               "top_p_top_k", "min_p", "temperature"]
    defaults = [s.name.lower() for s in DEFAULT_SAMPLER_ORDER]
    others = [n for n in defaults if n not in kobold_relative_order(defaults)]
    assert [priority.index(n) for n in others] == [defaults.index(n) for n in others]
    assert params_for(sampler_order=[6, 0, 1, 3, 4, 2, 5], top_p=0.9).sampler_order() == \
        tuple(SamplerStage[n.upper()] for n in priority)


def test_top_k_place_when_top_p_is_off_and_partial_orders():
    priority = mapping.kobold_sampler_priority([6, 0, 1, 3, 4, 2, 5], top_p=1.0)
    assert kobold_relative_order(priority) == ["penalties", "top_p_top_k", "top_a", "tfs",
                                               "typical_p", "min_p", "temperature"]
    # SillyTavern's default and a list without repetition penalty (KoboldCpp allows 6 ids)
    assert kobold_relative_order(mapping.kobold_sampler_priority(list(range(7)))) == \
        ["top_p_top_k", "top_a", "min_p", "tfs", "typical_p", "temperature", "penalties"]
    short = mapping.kobold_sampler_priority([5, 4, 3, 2, 1, 0], top_p=0.5)
    assert sorted(short) == sorted(s.name.lower() for s in SamplerStage)
    assert kobold_relative_order(short) == ["penalties", "temperature", "typical_p", "tfs",
                                            "top_p_top_k", "min_p", "top_a"]


# ---- grammar --------------------------------------------------------------------------------

def test_grammar_becomes_structured_outputs():
    assert params_for(grammar="").structured_outputs is None
    assert params_for(grammar="  \n").structured_outputs is None
    gbnf = 'root ::= "yes" | "no"'
    constraint = params_for(grammar=gbnf).structured_outputs
    assert constraint.grammar == gbnf
    check_structured_outputs(constraint, "grammar")      # compiles
    bad = params_for(grammar="root ::= undefined_rule").structured_outputs
    with pytest.raises(SamplingParamError) as err:
        check_structured_outputs(bad, "grammar")
    assert err.value.param == "grammar"


# ---- context --------------------------------------------------------------------------------

def test_context_and_length_rules():
    assert mapping.context_size(None, 2048) == 2048
    assert mapping.context_size(8192, 2048) == 2048          # clamped to the model's
    assert mapping.context_size(1024, 2048) == 1024
    assert mapping.generation_length(None, 2048) == mapping.DEFAULT_MAX_LENGTH
    assert mapping.generation_length(None, 100) == 99
    assert mapping.generation_length(None, 2048, server_default=64) == 64   # --default-max-tokens
    assert mapping.generation_length(200, 1024) == 200
    with pytest.raises(SamplingParamError, match="max_length"):
        mapping.generation_length(300, 200)
    with pytest.raises(SamplingParamError, match="max_context_length"):
        mapping.context_size(0, 2048)


def test_prompt_is_cut_from_the_left_keeping_special_tokens_and_memory():
    prompt = list(range(100, 120))
    assert mapping.fit_prompt([], [], prompt, 8) == prompt[-8:]
    assert mapping.fit_prompt([1], [], prompt, 8) == [1] + prompt[-7:]
    assert mapping.fit_prompt([1], [50, 51], prompt, 8) == [1, 50, 51] + prompt[-5:]
    assert mapping.fit_prompt([1], [50], prompt, 100) == [1, 50] + prompt
    assert mapping.fit_prompt([1], [50, 51], prompt, 2) == [50, 51]   # nothing else fits
    assert mapping.fit_prompt([], [], prompt, 0) == prompt[-1:]         # at least one token


def test_prompt_budget_with_the_tokenizer(tokenizer):
    text = " ".join(f"word{i}" for i in range(60))
    ids = tokenizer.encode(text, add_special_tokens=False)
    special = tokenizer.encode("", add_special_tokens=True)
    context, max_length = 40, 16
    fitted = mapping.fit_prompt(special, [], ids, context - max_length)
    assert len(fitted) == context - max_length
    assert fitted == (special + ids[-(context - max_length - len(special)):])
