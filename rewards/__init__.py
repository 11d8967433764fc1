"""Reward functions for GRPO/PPO, by name, with their YAML parameters bound.

Contract (TRL's reward-function signature, `trl/rewards/accuracy_rewards.py`)::

    fn(prompts, completions, **columns) -> list[float | None]

- `prompts`, `completions`: one entry per completion; strings, or conversations
  (`[{"role": "assistant", "content": ...}]`) -- every reward reads both (`completion_text`).
- `columns`: the batch's dataset columns, one value per completion (e.g. `answer`), plus what
  the trainer adds (TRL: `completion_ids`, `trainer_state`, ...); a reward takes `**columns`.
  A named parameter without a default, TRL-style `fn(prompts, completions, answer, **kw)`,
  receives the dataset column of that name.
- One score per completion; `None` = not applicable (e.g. no gold answer on that row).
- Parameters are keyword-only arguments after `completions`; a recipe entry
  `{name: format, weight: 0.2, pattern: "..."}` binds `pattern=` (`build_reward`). Names starting
  with `_` are not settable from YAML.
- Registered with `@REWARDS.register("name")`; every name appears in `alignkit list`. A reward may
  carry `fn.check_params(params)`, raising ValueError for bad values, run when the recipe is validated. A user
  function by import path: `my_rewards.exact` is `exact` in `my_rewards.py` beside the recipe
  (`add_recipe_folder`) or anywhere on the import path.

A score that is NaN, infinite or not a number, and every score of a call that raised, becomes
`None`: it counts 0 like "not applicable", is counted per reward (`BoundReward.missing`,
`missing_metrics`) and is reported once per reward and kind, naming the reward.

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
import os
import sys
import traceback
from math import isfinite
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from alignment.registry import did_you_mean
from rewards.base import _TRAINER_KWARGS, REWARDS, RewardFn, answer_text, completion_text
from rewards import code, format, judge, length, math, model  # noqa: F401 -- registers the rewards
from rewards.model import set_stage_model_loader
from rewards.sandbox import SandboxResult, run_python

__all__ = [
    "REWARDS", "RewardFn", "BoundReward", "build_reward", "combine_rewards", "score", "missing_metrics",
    "add_recipe_folder", "completion_text", "answer_text", "set_stage_model_loader", "run_python", "SandboxResult",
]

_SPEC_KEYS = ("name", "weight")
_DEFAULT_WEIGHT = 1.0


class RewardError(ValueError):
    """A reward broke its contract in a way no score can stand for: it returned the wrong number of scores or not a
    list, or a dataset column shadows one of its recipe parameters. The stage stops (exit 2) naming the reward;
    a rerun would stop the same way."""


class BoundReward:
    """A reward function with its recipe parameters bound, named after the recipe's `name`.

    Calls return one float or None per completion: a NaN, inf or non-number score, or the scores of
    a call that raised, become None and are counted in `missing` (reported once per kind).

    A class, not a closure or `functools.partial`: TRL's async GRPO worker pickles reward
    functions (closures cannot be pickled), and TRL names a reward by `__name__`, unwrapping a
    partial to the inner function's own name (`format_reward` instead of `format`).
    """

    def __init__(self, name: str, fn: RewardFn, params: Mapping[str, Any], columns: Sequence[str] = ()):
        self.__name__ = name
        self.fn = fn
        self.params = dict(params)
        self.columns = tuple(columns)  # named parameters filled from the dataset column of that name
        self.reads = self.columns + _gold_column(fn, self.params)  # every dataset column it reads (validate checks)
        self.missing = 0  # scores turned into None since the last `missing_metrics`
        self.window = [0, 0]  # [scores asked, scores lost] since the last `lost_everything`
        self._reported: set[str] = set()

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        # A dataset column named like a recipe parameter would silently replace it; refuse instead.
        clash = sorted(self.params.keys() & columns.keys())
        if clash:
            raise RewardError(
                f"reward '{self.__name__}': dataset column(s) {clash} have the names of parameters set in its "
                f"recipe entry; rename the column(s) or remove the parameter(s) from the entry"
            )
        absent = [c for c in self.columns if c not in columns]
        if absent:
            data = sorted(k for k in columns if k not in _TRAINER_KWARGS)
            raise KeyError(f"reward '{self.__name__}' reads column(s) {absent} (its parameters without a default), "
                           f"which the dataset does not have (columns: {', '.join(data) or 'none'})")
        n = len(completions)
        self.window[0] += n
        try:
            values = self.fn(prompts=prompts, completions=completions, **self.params, **columns)
        except Exception as e:  # a flaky scorer (an API, a parser) must not end the stage: None, counted
            self._lose(n, "raised", f"{type(e).__name__}: {e}")
            return [None] * n
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise RewardError(f"reward '{self.__name__}' returned {type(values).__name__}; expected a list of "
                             f"one score per completion")
        if len(values) != n:
            raise RewardError(f"reward '{self.__name__}' returned {len(values)} scores for {n} completions")
        return [self._score(v, i) for i, v in enumerate(values)]

    def _score(self, value, index: int) -> float | None:
        if value is None:
            return None
        try:
            number = None if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not isfinite(number):
            kind = "not a number" if number is None else str(number)
            self._lose(1, kind, f"{_short(value)} for completion {index}")
            return None
        return number

    def _lose(self, count: int, kind: str, detail: str) -> None:
        self.missing += count
        self.window[1] += count
        if kind not in self._reported:
            self._reported.add(kind)
            print(f"alignkit: reward '{self.__name__}' {'raised' if kind == 'raised' else 'returned'} {detail}; "
                  f"scored None (0 in the total), counted in reward/{self.__name__}/missing", file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"BoundReward({self.__name__!r}, {self.params})"


def missing_metrics(funcs: Sequence[RewardFn]) -> dict[str, int]:
    """`reward/<name>/missing`: scores each reward lost (NaN, inf, not a number, raised) since the
    last call -- for a stage to log per step; resets the counts."""
    out = {}
    for fn in funcs:
        if isinstance(fn, BoundReward):
            out[f"reward/{fn.__name__}/missing"], fn.missing = fn.missing, 0
    return out


def lost_everything(funcs: Sequence[RewardFn]) -> Optional[bool]:
    """Whether every reward lost every score it was asked for since the last call (a step that trains on
    nothing); None when none was asked (e.g. a step that reuses an earlier generation). Resets the window."""
    bound = [fn for fn in funcs if isinstance(fn, BoundReward)]
    windows = [fn.window for fn in bound]
    for fn in bound:
        fn.window = [0, 0]
    if not windows or all(asked == 0 for asked, _ in windows):
        return None
    return all(lost == asked for asked, lost in windows)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_reward(spec: Mapping[str, Any]) -> BoundReward:
    """The reward `spec["name"]` with the spec's other keys (not `weight`) bound as parameters.

    `name` is a registered reward or a user function's import path (`pkg.module:fn` or
    `pkg.module.fn`), looked up on the import path and in the folders of `add_recipe_folder`.
    The result is a picklable `BoundReward` whose `__name__` is `name`.

    Raises:
        ValueError: unknown name (lists the known ones), unknown parameter (names the closest
            valid one), missing required parameter, bad weight, not a reward function.
        ImportError: the module of an import path is not found, or fails to import (names its
            file and line).
    """
    if "name" not in spec:
        raise ValueError(f"a reward needs `name:` (one of: {', '.join(REWARDS.names())}); got {dict(spec)}")
    name = spec["name"]
    _check_weight(name, spec.get("weight", _DEFAULT_WEIGHT))
    params = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    fn = _resolve(name)
    columns = _check_params(name, fn, params)
    check = getattr(fn, "check_params", None)  # a reward's own checks of its values (e.g. judge's URL, template)
    if check is not None:
        check(params)
    return BoundReward(name, fn, params, columns)


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
        total: (B,) sum of weight * score; per_fn: reward name -> (B,) scores, a NaN, inf,
            non-number or raised score as None (counted in `missing_metrics`).

    Raises:
        ValueError: lengths disagree.
        RewardError: a reward returned the wrong number of scores, or not a list.
    """
    if len(funcs) != len(weights):
        raise ValueError(f"{len(funcs)} reward functions but {len(weights)} weights")
    n = len(completions)
    total = [0.0] * n
    per_fn: dict[str, list[float | None]] = {}
    for fn, weight in zip(funcs, weights):
        name = getattr(fn, "__name__", repr(fn))
        if not isinstance(fn, BoundReward):
            fn = BoundReward(name, fn, {})
        values = fn(prompts=prompts, completions=completions, **columns)
        if name in per_fn:
            raise ValueError(f"two reward functions are named '{name}'; scores are reported by name")
        per_fn[name] = values
        total = [t + weight * v if v is not None else t for t, v in zip(total, values)]
    return total, per_fn


def _check_weight(name: str, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"reward '{name}': weight must be a number, got {weight!r}")


# Folders searched for user reward modules (`add_recipe_folder`); an environment variable, so the
# stage and eval processes alignkit starts search them too.
REWARD_PATH_ENV = "ALIGNKIT_REWARD_PATH"


def add_recipe_folder(folder: str | Path) -> None:
    """Search `folder` (a recipe's) for user reward modules, here and in child processes, so
    `my_rewards.exact` in `my_rewards.py` beside the recipe imports from any working directory.
    It is searched after the installed packages: a module there cannot hide one of theirs."""
    folder = str(Path(folder).resolve())
    known = [p for p in os.environ.get(REWARD_PATH_ENV, "").split(os.pathsep) if p]
    if folder not in known:
        os.environ[REWARD_PATH_ENV] = os.pathsep.join(known + [folder])


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
    module = _import(name, module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        public = [a for a in dir(module) if not a.startswith("_")]
        raise ValueError(f"reward '{name}': module '{module_name}' has no '{attr}'{did_you_mean(attr, public)}")
    if not callable(fn):
        raise ValueError(f"reward '{name}': '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _import(name: str, module_name: str):
    """Import a user reward module; any failure is one ImportError naming its file and line."""
    for folder in os.environ.get(REWARD_PATH_ENV, "").split(os.pathsep):
        if folder and folder not in sys.path:
            sys.path.append(folder)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):  # the module itself (or its package)
            raise ImportError(f"reward '{name}': cannot import module '{module_name}' ({e}); put "
                              f"{module_name.split('.')[0]}.py beside the recipe or on PYTHONPATH") from None
        where = _user_frame(e)
        raise ImportError(f"reward '{name}': {where}importing module '{module_name}' failed: {e}") from None
    except SyntaxError as e:
        raise ImportError(f"reward '{name}': {e.filename}:{e.lineno}: syntax error in module '{module_name}': "
                          f"{e.msg}") from None
    except Exception as e:  # the module raised while being imported
        raise ImportError(f"reward '{name}': {_user_frame(e)}importing module '{module_name}' raised "
                          f"{type(e).__name__}: {e}") from None


def _user_frame(e: BaseException) -> str:
    """'file:line: ' of the innermost frame outside importlib, where the module failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<frozen")]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""


def _gold_column(fn: RewardFn, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The dataset column a reward names with a `column` parameter (math_accuracy, code_exec: the gold answers or
    tests), as the recipe sets it or by its default; () for a reward without one."""
    try:
        param = inspect.signature(fn).parameters.get("column")
    except (TypeError, ValueError):
        return ()
    value = params.get("column", param.default if param is not None else None)
    return (value,) if isinstance(value, str) else ()


def _check_params(name: str, fn: RewardFn, params: Mapping[str, Any]) -> list[str]:
    """Check `params` against `fn`'s signature; return the names of its column parameters.

    `fn` takes `completions` (and `prompts`) by name, as TRL calls it, and `**columns`. Every param
    is a keyword of `fn` (not `_private`); every keyword-only parameter without a default is given;
    a named parameter without a default that the recipe does not set (TRL-style
    `fn(prompts, completions, answer, **kw)`) is a column parameter: it reads the dataset column.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []  # builtins / C callables: nothing to check against
    P = inspect.Parameter
    by_name = sig.parameters
    kinds = {p.name: p.kind for p in by_name.values()}
    positional_only = [p for p in by_name.values() if p.kind == P.POSITIONAL_ONLY and p.default is P.empty]
    if kinds.get("completions") not in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) or positional_only or (
            P.VAR_KEYWORD not in kinds.values()):
        raise ValueError(f"reward '{name}' must have the signature fn(prompts, completions, **columns), got {name}{sig}")
    keywords = [p for k, p in by_name.items() if k not in ("prompts", "completions")
                and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    settable = {p.name: p for p in keywords if not p.name.startswith("_")}
    errors = []
    for key in params:
        if key not in settable:
            errors.append(
                f"reward '{name}' has no parameter '{key}'{did_you_mean(key, settable)}; "
                f"its parameters: {', '.join(settable) or 'none'}"
            )
    for key, p in settable.items():
        if p.default is P.empty and p.kind == P.KEYWORD_ONLY and key not in params:
            errors.append(f"reward '{name}' needs parameter '{key}' (add `{key}: ...` to its recipe entry)")
    if errors:
        raise ValueError("; ".join(errors))
    return [p.name for p in keywords if p.default is P.empty and p.kind == P.POSITIONAL_OR_KEYWORD
            and p.name not in params]
