"""Reward functions for GRPO/PPO, by name, with their YAML parameters bound.

Contract (TRL's reward-function signature, `trl/rewards/accuracy_rewards.py`)::

    fn(prompts, completions, **columns) -> list[float | None]

- `prompts`, `completions`: one entry per completion; strings, or conversations
  (`[{"role": "assistant", "content": ...}]`) -- every reward reads both (`completion_text`).
- `columns`: the batch's dataset columns, one value per completion (e.g. `answer`), plus what
  the trainer adds (TRL: `completion_ids`, `trainer_state`, ...); a reward takes `**columns`.
- One score per completion; `None` = not applicable (e.g. no gold answer on that row).
- Parameters are keyword arguments after `completions`; a recipe entry
  `{name: format, weight: 0.2, pattern: "..."}` binds `pattern=` (`build_reward`). Names starting
  with `_` are not settable from YAML.
- Registered with `@REWARDS.register("name")`; every name appears in `alignkit list`.

Combining (`score`): total = sum of weight * score over the rewards, a `None` counting as 0 --
the same as TRL's GRPOTrainer (NaN + nansum), so logged and trained totals agree.

Example:
    >>> funcs, weights = combine_rewards([{"name": "format", "weight": 0.5},
    ...                                   {"name": "length", "max_length": 8, "cache_length": 4}])
    >>> total, per_fn = score(funcs, weights, ["q"], ["<think>a</think><answer>4</answer>"])
    >>> total, per_fn
    ([-0.5], {'format': [1.0], 'length': [-1.0]})
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping, Sequence

from alignment.registry import did_you_mean
from rewards.base import REWARDS, RewardFn, answer_text, completion_text
from rewards import code, format, length, math, model  # noqa: F401 -- registers the rewards
from rewards.model import set_stage_model_loader
from rewards.sandbox import SandboxResult, run_python

__all__ = [
    "REWARDS", "RewardFn", "BoundReward", "build_reward", "combine_rewards", "score", "completion_text",
    "answer_text", "set_stage_model_loader", "run_python", "SandboxResult",
]

_SPEC_KEYS = ("name", "weight")
_DEFAULT_WEIGHT = 1.0


class BoundReward:
    """A reward function with its recipe parameters bound, named after the recipe's `name`.

    A class, not a closure or `functools.partial`: TRL's async GRPO worker pickles reward
    functions (closures cannot be pickled), and TRL names a reward by `__name__`, unwrapping a
    partial to the inner function's own name (`format_reward` instead of `format`).
    """

    def __init__(self, name: str, fn: RewardFn, params: Mapping[str, Any]):
        self.__name__ = name
        self.fn = fn
        self.params = dict(params)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        # A dataset column named like a parameter would silently replace it; refuse instead.
        clash = sorted(self.params.keys() & columns.keys())
        if clash:
            raise ValueError(
                f"reward '{self.__name__}': dataset column(s) {clash} have the names of its "
                f"parameters; rename the column(s)"
            )
        return self.fn(prompts, completions, **self.params, **columns)

    def __repr__(self) -> str:
        return f"BoundReward({self.__name__!r}, {self.params})"


def build_reward(spec: Mapping[str, Any]) -> BoundReward:
    """The reward `spec["name"]` with the spec's other keys (not `weight`) bound as parameters.

    `name` is a registered reward or a user function's import path (`pkg.module:fn` or
    `pkg.module.fn`). The result is a picklable `BoundReward` whose `__name__` is `name`.

    Raises:
        ValueError: unknown name (lists the known ones), unknown parameter (names the closest
            valid one), missing required parameter, bad weight, not a reward function.
        ImportError: the module of an import path does not import.
    """
    if "name" not in spec:
        raise ValueError(f"a reward needs `name:` (one of: {', '.join(REWARDS.names())}); got {dict(spec)}")
    name = spec["name"]
    _check_weight(name, spec.get("weight", _DEFAULT_WEIGHT))
    params = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    fn = _resolve(name)
    _check_params(name, fn, params)
    return BoundReward(name, fn, params)


def combine_rewards(specs: Sequence[Mapping[str, Any]]) -> tuple[list[BoundReward], list[float]]:
    """Build each spec (`build_reward`); return the functions and their weights (default 1.0).

    Raises:
        ValueError: every bad spec at once, each prefixed with `rewards[i]`; no specs; a name twice.
    """
    if not specs:
        raise ValueError(f"no rewards given; add at least one (known: {', '.join(REWARDS.names())})")
    funcs, weights, errors = [], [], []
    for i, spec in enumerate(specs):
        try:
            funcs.append(build_reward(spec))
            weights.append(float(spec.get("weight", _DEFAULT_WEIGHT)))
        except (ValueError, ImportError) as e:
            errors.append(f"rewards[{i}]: {e}")
    names = [f.__name__ for f in funcs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"reward '{name}' is listed {names.count(name)} times; scores are logged by name, "
                      f"so list it once (or register a second function under another name)")
    if errors:
        raise ValueError("\n".join(errors))
    return funcs, weights


def score(funcs: Sequence[RewardFn], weights: Sequence[float], prompts: list, completions: list,
          **columns) -> tuple[list[float], dict[str, list[float | None]]]:
    """Run every reward; return the weighted total per completion (None counts 0) and each score.

    Returns:
        total: (B,) sum of weight * score; per_fn: reward name -> (B,) scores as returned.

    Raises:
        ValueError: lengths disagree, or a reward returned the wrong number of scores.
    """
    if len(funcs) != len(weights):
        raise ValueError(f"{len(funcs)} reward functions but {len(weights)} weights")
    n = len(completions)
    total = [0.0] * n
    per_fn: dict[str, list[float | None]] = {}
    for fn, weight in zip(funcs, weights):
        name = getattr(fn, "__name__", repr(fn))
        values = list(fn(prompts=prompts, completions=completions, **columns))
        if len(values) != n:
            raise ValueError(f"reward '{name}' returned {len(values)} scores for {n} completions")
        if name in per_fn:
            raise ValueError(f"two reward functions are named '{name}'; scores are reported by name")
        per_fn[name] = values
        total = [t + weight * v if v is not None else t for t, v in zip(total, values)]
    return total, per_fn


def _check_weight(name: str, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"reward '{name}': weight must be a number, got {weight!r}")


def _resolve(name: str) -> RewardFn:
    """A registered reward, or the function at import path `pkg.module:fn` / `pkg.module.fn`."""
    if name in REWARDS:
        return REWARDS.get(name)
    if ":" not in name and "." not in name:
        raise ValueError(
            f"unknown reward '{name}'{did_you_mean(name, REWARDS.names())}; known: "
            f"{', '.join(REWARDS.names())} (or a function's import path, 'my_pkg.my_module:my_reward')"
        )
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"reward '{name}': cannot import module '{module_name}' ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        public = [a for a in dir(module) if not a.startswith("_")]
        raise ValueError(f"reward '{name}': module '{module_name}' has no '{attr}'{did_you_mean(attr, public)}")
    if not callable(fn):
        raise ValueError(f"reward '{name}': '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _check_params(name: str, fn: RewardFn, params: Mapping[str, Any]) -> None:
    """Every param is a keyword of `fn` (not `_private`) and every required keyword is given."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins / C callables: nothing to check against
    kinds = [p.kind for p in sig.parameters.values()]
    positional = [k for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 or inspect.Parameter.VAR_KEYWORD not in kinds:
        raise ValueError(f"reward '{name}' must have the signature fn(prompts, completions, **columns), got {name}{sig}")
    keywords = list(sig.parameters.values())[2:]
    settable = {p.name: p for p in keywords
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                and not p.name.startswith("_")}
    errors = []
    for key in params:
        if key not in settable:
            errors.append(
                f"reward '{name}' has no parameter '{key}'{did_you_mean(key, settable)}; "
                f"its parameters: {', '.join(settable) or 'none'}"
            )
    for key, p in settable.items():
        if p.default is inspect.Parameter.empty and key not in params:
            errors.append(f"reward '{name}' needs parameter '{key}' (add `{key}: ...` to its recipe entry)")
    if errors:
        raise ValueError("; ".join(errors))
