"""Reward-model reward: score completions with the model trained by an earlier `reward` stage.

Loading a model is the pipeline's job, so this module only holds a hook: the pipeline calls
`set_stage_model_loader(fn)`, with `fn(stage) -> scorer` and `scorer(prompts, completions) ->
list[float]` -- in a stage child, `alignment.models.RewardScorer`, the scorer the evals use too, which
tokenizes as TRL's RewardTrainer trained the model. Scorers are cached per stage until the hook is
set again.
"""
from __future__ import annotations

from typing import Callable

from rewards.base import REWARDS

Scorer = Callable[[list, list], list]
StageModelLoader = Callable[[str], Scorer]

_stage_loader: StageModelLoader | None = None
_scorers: dict[str, Scorer] = {}


def set_stage_model_loader(fn: StageModelLoader | None) -> None:
    """Install the hook that turns a stage name into a scorer (None removes it; clears the cache)."""
    global _stage_loader
    _stage_loader = fn
    _scorers.clear()


@REWARDS.register("reward_model")
def reward_model(prompts, completions, *, stage: str, _loader: StageModelLoader | None = None,
                 **columns) -> list[float]:
    """The scores of the reward model trained by stage `stage`, one per completion.

    Args:
        stage: the recipe stage (method `reward`) whose model scores.
        _loader: a loader to use instead of the installed hook, uncached (tests).

    Raises:
        RuntimeError: no loader is installed.
        ValueError: the scorer returned the wrong number of scores.
    """
    if _loader is not None:
        scorer = _loader(stage)
    elif stage in _scorers:
        scorer = _scorers[stage]
    elif _stage_loader is not None:
        scorer = _scorers[stage] = _stage_loader(stage)
    else:
        raise RuntimeError(
            f"reward 'reward_model' (stage '{stage}') has no model loader; the pipeline installs one "
            f"with rewards.model.set_stage_model_loader(fn) before training -- outside it, call that "
            f"yourself or pass _loader="
        )
    scores = list(scorer(prompts, completions))
    if len(scores) != len(completions):
        raise ValueError(
            f"reward 'reward_model': the scorer of stage '{stage}' returned {len(scores)} scores for "
            f"{len(completions)} completions"
        )
    return [float(s) for s in scores]
