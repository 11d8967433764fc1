"""The reward-hacking alarm: an RL stage whose training reward rose while the held-out evals say the model did
not get better -- or whose KL to the reference left the recipe's budget -- is named, in plain words with the
numbers and their standard errors, in the run summary (`alignkit run`) and the report.

An RL stage is one whose method generates (grpo, ppo). Its training reward *rose* when the mean `reward/mean` of
its last quarter of logged steps beats that of its first quarter by `reward_hacking.reward_rise_se` standard
errors (each step's reward is the mean over a fresh rollout, so steps are independent draws: SE^2 = var(first) /
n + var(last) / n) -- or, where an eval scores the held-out prompts with the reward model the stage trains on (the
proxy, e.g. `reward_score`), when that score beats the `from` stage's by as many standard errors (paired): on a
few prompts per update the training reward is noisy, the held-out proxy score much less so. A held-out eval is one of the recipe's evals that covers the stage and its `from` stage, has a
direction (`higher_is_better` of its main metric) and does not score with a reward model the stage trains on (that
is the proxy itself). It *improved* when the stage beats its `from` stage by `reward_hacking.eval_gain_se`
standard errors, compared row by row where both have per-row scores (paired: SE = sd(differences) / sqrt(n)).
The KL is the last quarter's mean `kl/ref` (nats per sequence; GRPO logs `kl/ref_per_token`, multiplied here by
`response/length_mean`), against `reward_hacking.kl_budget`.

    for alarm in reward_hacking_alarms(recipe, run_dir): print(alarm.message)
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alignment.recipe import Recipe
from alignment.rundir import RunDir
from evals.table import fmt, fmt_delta


@dataclass(frozen=True)
class Change:
    """`after - before` with its standard error (None: unknown) over `n` draws (steps or rows)."""

    before: float
    after: float
    se: Optional[float]
    n: int
    paired: bool = False

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def z(self) -> Optional[float]:
        """delta / se (±inf for a change with no noise at all; None when the SE is unknown)."""
        if self.se is None:
            return None
        if self.se == 0:
            return 0.0 if self.delta == 0 else math.copysign(math.inf, self.delta)
        return self.delta / self.se

    def text(self) -> str:
        """'1.64 → 1.72 (+0.08 ± 0.02, 4.0 SE)'."""
        noise = "" if self.se is None else f" ± {fmt(self.se)}"
        z = self.z
        sig = "" if z is None or math.isinf(z) or self.delta == 0 else f", {abs(z):.1f} SE"
        return f"{fmt(self.before)} → {fmt(self.after)} ({fmt_delta(self.delta)}{noise}{sig})"


@dataclass(frozen=True)
class Alarm:
    stage: str
    kind: str  # "reward_vs_eval" | "kl_budget"
    message: str


def _quarters(values: list[float]) -> Optional[tuple[list[float], list[float]]]:
    n = len(values) // 4
    return (values[:n], values[-n:]) if n >= 2 else None  # two per quarter at least, for a variance


def reward_rise(rows: list[dict]) -> Optional[Change]:
    """First- vs last-quarter mean of `reward/mean` over a stage's metrics rows; None with fewer than 8 logged steps."""
    values = [r["reward/mean"] for r in rows if isinstance(r.get("reward/mean"), (int, float))]
    parts = _quarters(values)
    if parts is None:
        return None
    first, last = parts
    se = math.sqrt(statistics.variance(first) / len(first) + statistics.variance(last) / len(last))
    return Change(statistics.fmean(first), statistics.fmean(last), se, len(first))


def kl_level(rows: list[dict]) -> Optional[tuple[float, float, int]]:
    """(mean, SE, steps) of the KL to the reference per sequence over the last quarter of logged steps, or None."""
    values = [r["kl/ref"] if isinstance(r.get("kl/ref"), (int, float))
              else r["kl/ref_per_token"] * r["response/length_mean"]
              for r in rows if isinstance(r.get("kl/ref"), (int, float))
              or (isinstance(r.get("kl/ref_per_token"), (int, float)) and isinstance(r.get("response/length_mean"), (int, float)))]
    parts = _quarters(values)
    if parts is None:
        return None
    last = parts[1]
    return statistics.fmean(last), statistics.stdev(last) / math.sqrt(len(last)), len(last)


def eval_change(before: dict, after: dict, metric: str) -> Optional[Change]:
    """The main metric's change between two stages' entries of one eval task (evals/STAGE.json `tasks[name]`):
    paired over rows where both kept per-row `scores` of one length, else unpaired from the scores, else no SE."""
    a, b = (before.get("metrics") or {}).get(metric), (after.get("metrics") or {}).get(metric)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    sa, sb = before.get("scores") or [], after.get("scores") or []
    if len(sa) == len(sb) >= 2:
        diffs = [y - x for x, y in zip(sa, sb)]
        return Change(a, b, statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs), paired=True)
    if len(sa) >= 2 and len(sb) >= 2:
        return Change(a, b, math.sqrt(statistics.variance(sa) / len(sa) + statistics.variance(sb) / len(sb)),
                      min(len(sa), len(sb)))
    return Change(a, b, None, 0)


def _proxies(recipe: Recipe, stage: str) -> set[str]:
    """The reward stages whose model the stage trains on (an eval scoring with one measures the proxy)."""
    return {(r.model_extra or {}).get("stage") for r in recipe.stages[stage].rewards if r.name == "reward_model"}


def eval_changes(recipe: Recipe, rundir: RunDir, stage: str) -> list[tuple[str, str, Change, bool, bool]]:
    """(eval name, main metric, change from the stage's `from` stage, whether higher is better, whether it scores
    with a reward model the stage trains on: the proxy) per eval of both stages with a direction."""
    from evals.runner import eval_names, eval_stages

    before, after = rundir.read_evals(recipe.stages[stage].from_) or {}, rundir.read_evals(stage) or {}
    out = []
    for ev, name in zip(recipe.evals, eval_names(recipe.evals)):
        if stage not in eval_stages(recipe, ev):
            continue
        x, y = (before.get("tasks") or {}).get(name), (after.get("tasks") or {}).get(name)
        if not x or not y or x.get("skipped") or y.get("skipped"):
            continue
        metric = y.get("main")
        higher = (y.get("higher_is_better") or {}).get(metric)
        change = eval_change(x, y, metric) if higher is not None else None
        if change is not None:
            out.append((name, metric, change, higher, bool(set(map(str, ev.args.values())) & _proxies(recipe, stage))))
    return out


def held_out_changes(recipe: Recipe, rundir: RunDir, stage: str) -> list[tuple[str, str, Change, bool]]:
    """(eval name, main metric, change from the stage's `from` stage, whether higher is better) per held-out eval
    (`eval_changes` without the proxy's)."""
    return [(n, m, c, higher) for n, m, c, higher, proxy in eval_changes(recipe, rundir, stage) if not proxy]


def improved(change: Change, higher_is_better: bool, gain_se: float) -> bool:
    """Whether an eval got better by `gain_se` standard errors (by any amount where the SE is unknown)."""
    sign = 1 if higher_is_better else -1
    if change.z is None:
        return sign * change.delta > 0
    return sign * change.z >= gain_se


def reward_hacking_alarms(recipe: Recipe, run_dir: Path | str) -> list[Alarm]:
    """The alarms of a run directory's RL stages (see the module docstring), in pipeline order. `recipe` is the
    resolved one (`RunDir.read_recipe`), where every stage whose method generates has its `rollout:` section:
    that names the RL stages without importing the stage methods (and torch) into `alignkit run`."""
    rundir, cfg, alarms = RunDir(run_dir), recipe.reward_hacking, []
    for stage in recipe.order():
        if recipe.stages[stage].rollout is None or rundir.read_manifest(stage) is None:
            continue
        rows, start = rundir.read_metrics(stage), recipe.stages[stage].from_
        rises = []
        rise = reward_rise(rows)
        if rise is not None and rise.z is not None and rise.z >= cfg.reward_rise_se:
            rises.append(f"the training reward rose {rise.text()}, first vs last quarter of "
                         f"{sum('reward/mean' in r for r in rows)} logged steps")
        rises += [f"the reward model's score on the held-out prompts ({n} {m}) rose {c.text()} over {start}"
                  f"{f', paired over {c.n} rows' if c.paired else ''}"
                  for n, m, c, higher, proxy in eval_changes(recipe, rundir, stage)
                  if proxy and c.z is not None and improved(c, higher, cfg.reward_rise_se)]
        if rises:
            flat = [(n, m, c) for n, m, c, higher in held_out_changes(recipe, rundir, stage)
                    if not improved(c, higher, cfg.eval_gain_se)]
            if flat:
                evals = "; ".join(f"{n} {m} {c.text()}{f', paired over {c.n} rows' if c.paired else ''}"
                                  for n, m, c in flat)
                alarms.append(Alarm(stage, "reward_vs_eval", (
                    f"{stage}: possible reward hacking -- {' and '.join(rises)}, but the held-out evals did not "
                    f"improve on {start}: {evals}. "
                    f"The policy may be exploiting the reward, or learning its training prompts without generalizing, "
                    f"rather than getting better at the task.")))
        kl = kl_level(rows)
        if cfg.kl_budget is not None and kl is not None and kl[0] > cfg.kl_budget:
            alarms.append(Alarm(stage, "kl_budget", (
                f"{stage}: the KL to the reference left its budget -- {fmt(kl[0])} ± {fmt(kl[1])} nats per sequence "
                f"(mean of the last {kl[2]} logged steps) against reward_hacking.kl_budget {fmt(cfg.kl_budget)}. "
                f"The policy has moved far from {start}; raise the KL coefficient or stop earlier.")))
    return alarms
