"""The reorderable stages: which rows use each one, and its batched implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aphrodite.executor.sampling import filters, shaping
from aphrodite.executor.sampling.context import StageFn
from aphrodite.executor.sampling.dry import apply_dry
from aphrodite.executor.sampling.penalties import (apply_no_repeat_ngram, apply_penalties,
                                                   uses_penalties)
from aphrodite.executor.sampling.temperature import apply_temperature, uses_temperature
from aphrodite.sampling_params import SamplerStage, SamplingParams


@dataclass(frozen=True)
class Stage:
    uses: Callable[[SamplingParams], bool]   # a check on Python params, no tensor work
    apply: StageFn
    by_token_id: bool = False    # looks tokens up by id: greedy rows run it too (it can move
                                 # the argmax), and it needs full-vocabulary logits
    truncates: bool = False      # may leave few tokens: a chance to compact afterwards

    @property
    def for_greedy(self) -> bool:
        return self.by_token_id


S = SamplerStage
F = filters
STAGES: dict[SamplerStage, Stage] = {
    S.DRY: Stage(lambda p: p.dry_multiplier > 0, apply_dry, by_token_id=True),
    S.PENALTIES: Stage(uses_penalties, apply_penalties, by_token_id=True),
    S.NO_REPEAT_NGRAM: Stage(lambda p: p.no_repeat_ngram_size > 0, apply_no_repeat_ngram,
                             by_token_id=True),
    S.TEMPERATURE: Stage(uses_temperature, apply_temperature),
    S.TOP_NSIGMA: Stage(lambda p: p.nsigma > 0, F.apply_top_nsigma, truncates=True),
    S.TOP_P_TOP_K: Stage(F.uses_top_p_top_k, F.apply_top_p_top_k, truncates=True),
    S.TOP_A: Stage(lambda p: p.top_a > 0, F.apply_top_a, truncates=True),
    S.MIN_P: Stage(lambda p: p.min_p > 0, F.apply_min_p, truncates=True),
    S.TFS: Stage(lambda p: p.tfs < 1, F.apply_tfs, truncates=True),
    S.ETA_CUTOFF: Stage(lambda p: p.eta_cutoff > 0, F.apply_eta_cutoff, truncates=True),
    S.EPSILON_CUTOFF: Stage(lambda p: p.epsilon_cutoff > 0, F.apply_epsilon_cutoff,
                            truncates=True),
    S.TYPICAL_P: Stage(lambda p: p.typical_p < 1, F.apply_typical, truncates=True),
    S.QUADRATIC: Stage(lambda p: p.smoothing_factor > 0, shaping.apply_quadratic),
    S.XTC: Stage(lambda p: p.xtc_probability > 0, shaping.apply_xtc),
}
