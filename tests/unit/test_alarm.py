"""The reward-hacking alarm (evals/alarm.py) on synthetic metrics and eval rows over the shipped quick-start recipes:
quickstart-ppo's case (reward-model score up, accuracy flat) triggers it, the demo's (GRPO reward up, accuracy up)
does not; the KL budget; and the alarm reaches the run summary and the report."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignment.recipe import dump_recipe
from alignment.validate import load_recipe
from evals.alarm import Change, eval_change, kl_level, reward_hacking_alarms, reward_rise
from tests.helpers import write_jsonl

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"


def rising(lo: float, hi: float, steps: int = 20, noise: float = 0.02, seed: int = 0, **extra) -> list[dict]:
    """`reward/mean` rising linearly from lo to hi over `steps` logged steps, with Gaussian noise."""
    rng = random.Random(seed)
    return [{"step": i + 1, "reward/mean": lo + (hi - lo) * i / (steps - 1) + rng.gauss(0, noise), **extra}
            for i in range(steps)]


def flipped(scores: list[float], up: int, down: int) -> list[float]:
    """`scores` (0/1 per row) with `up` wrong rows made right and `down` right rows made wrong."""
    out, wrong, right = list(scores), [i for i, s in enumerate(scores) if s == 0], [i for i, s in enumerate(scores) if s == 1]
    for i in wrong[:up]:
        out[i] = 1.0
    for i in right[:down]:
        out[i] = 0.0
    return out


def write_run(tmp_path: Path, recipe_file: str, metrics: dict[str, list[dict]], evals: dict[str, dict], **top):
    recipe = load_recipe(QUICKSTART / recipe_file)
    recipe = recipe.model_copy(update=top)
    run_dir = tmp_path / recipe.name
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    for stage in recipe.stages:
        (run_dir / stage).mkdir()
        (run_dir / stage / "manifest.json").write_text(json.dumps({"stage": stage, "status": "done"}))
        write_jsonl(run_dir / stage / "metrics.jsonl", metrics.get(stage, []))
    (run_dir / "evals").mkdir()
    for stage, tasks in evals.items():
        (run_dir / "evals" / f"{stage}.json").write_text(json.dumps({"stage": stage, "tasks": tasks}))
    return recipe, run_dir


def accuracy(scores: list[float]) -> dict:
    return {"metrics": {"accuracy": sum(scores) / len(scores)}, "main": "accuracy",
            "higher_is_better": {"accuracy": True}, "scores": scores}


def reward_score(mean: float, n: int = 200) -> dict:
    scores = [mean + (0.3 if i % 2 else -0.3) for i in range(n)]
    return {"metrics": {"reward": mean}, "main": "reward", "higher_is_better": {"reward": True}, "scores": scores}


SFT_ACCURACY = [1.0] * 140 + [0.0] * 60  # 70 % of 200 held-out sums


def ppo_run(tmp_path, **top):
    """quickstart-ppo as measured: RM reward 1.64 -> 1.72 over 20 updates, greedy RM score on the held-out prompts
    1.67 -> 1.79, accuracy 70 % -> 70 % (5 sums learnt, 5 lost)."""
    evals = {"base": {"accuracy": accuracy([0.0] * 171 + [1.0] * 29), "reward_score": reward_score(0.9)},
             "sft": {"accuracy": accuracy(SFT_ACCURACY), "reward_score": reward_score(1.67)},
             "ppo": {"accuracy": accuracy(flipped(SFT_ACCURACY, 5, 5)), "reward_score": reward_score(1.79)}}
    return write_run(tmp_path, "ppo.yaml", {"ppo": rising(1.64, 1.72, kl_ref=0.0)}, evals, **top)


def arith_run(tmp_path, grpo_scores):
    """The demo: GRPO reward (math_accuracy) 0.60 -> 0.71 over 20 steps; accuracy from sft's 70.5 %."""
    sft = [1.0] * 141 + [0.0] * 59
    evals = {"base": {"accuracy": accuracy([1.0] * 29 + [0.0] * 171)}, "sft": {"accuracy": accuracy(sft)},
             "grpo": {"accuracy": accuracy(grpo_scores(sft))}}
    return write_run(tmp_path, "arith.yaml", {"grpo": rising(0.60, 0.71, noise=0.03)}, evals)


def test_quickstart_ppo_triggers_it(tmp_path):
    recipe, run_dir = ppo_run(tmp_path)
    [alarm] = reward_hacking_alarms(recipe, run_dir)
    assert alarm.stage == "ppo" and alarm.kind == "reward_vs_eval"
    text = alarm.message
    assert text.startswith("ppo: possible reward hacking -- the training reward rose 1.6")
    assert "first vs last quarter of 20 logged steps" in text
    # accuracy did not improve on sft: ±0 with its paired standard error sqrt(10 / 199) / sqrt(200) = 0.0159
    assert "did not improve on sft: accuracy accuracy 0.7 → 0.7 (±0 ± 0.01585), paired over 200 rows" in text
    assert "and the reward model's score on the held-out prompts (reward_score reward) rose 1.67 → 1.79" in text
    assert "paired over 200 rows. The policy" in text  # the proxy is evidence the reward rose, never a held-out eval


def test_the_demo_does_not(tmp_path):
    # 12 sums learnt, 3 lost: 70.5 % -> 75 %, +0.045 with a paired SE of 0.019 (2.3 SE): an improvement
    recipe, run_dir = arith_run(tmp_path, lambda sft: flipped(sft, 12, 3))
    assert reward_hacking_alarms(recipe, run_dir) == []


def test_the_demo_would_if_its_accuracy_had_stayed_flat(tmp_path):
    recipe, run_dir = arith_run(tmp_path, lambda sft: flipped(sft, 4, 3))  # +0.005: 0.3 SE
    [alarm] = reward_hacking_alarms(recipe, run_dir)
    assert alarm.stage == "grpo" and "did not improve on sft: accuracy accuracy 0.705 → 0.71 (+0.005 ±" in alarm.message


def test_a_flat_training_reward_and_proxy_score_raise_no_alarm(tmp_path):
    recipe, run_dir = ppo_run(tmp_path)
    write_jsonl(run_dir / "ppo" / "metrics.jsonl", rising(1.68, 1.68, kl_ref=0.0))
    (run_dir / "evals" / "ppo.json").write_text(json.dumps({"stage": "ppo", "tasks": {
        "accuracy": accuracy(flipped(SFT_ACCURACY, 5, 5)), "reward_score": reward_score(1.67)}}))
    assert reward_hacking_alarms(recipe, run_dir) == []


def test_the_held_out_proxy_score_rising_counts_when_the_training_reward_is_noise(tmp_path):
    """quickstart-ppo as measured on the bundled model: 32 prompts per update make the training reward swing
    0.29-0.80 (first vs last quarter +1.0 SE), while the reward model's greedy score on the 200 held-out prompts
    rose 0.55 -> 0.68 (3.7 SE paired) and accuracy fell 64 % -> 57 %."""
    recipe, run_dir = ppo_run(tmp_path)
    write_jsonl(run_dir / "ppo" / "metrics.jsonl", rising(0.53, 0.60, noise=0.15, kl_ref=0.0))
    sft = [1.0] * 128 + [0.0] * 72
    rng = random.Random(0)
    before = [0.55 + rng.gauss(0, 0.3) for _ in range(200)]
    after = [b + 0.13 + rng.gauss(0, 0.25) for b in before]
    score = lambda s: {"metrics": {"reward": sum(s) / len(s)}, "main": "reward", "higher_is_better": {"reward": True}, "scores": s}
    for stage, acc, rm in (("sft", sft, before), ("ppo", flipped(sft, 15, 29), after)):
        (run_dir / "evals" / f"{stage}.json").write_text(json.dumps({"stage": stage, "tasks": {
            "accuracy": accuracy(acc), "reward_score": score(rm)}}))
    assert reward_rise(rising(0.53, 0.60, noise=0.15)).z < 2  # the training reward alone: no alarm
    [alarm] = reward_hacking_alarms(recipe, run_dir)
    assert alarm.kind == "reward_vs_eval" and "the training reward" not in alarm.message
    assert "the reward model's score on the held-out prompts (reward_score reward) rose 0.5" in alarm.message
    assert "over sft, paired over 200 rows" in alarm.message and "accuracy accuracy 0.64 → 0.57" in alarm.message


def test_the_kl_budget(tmp_path):
    from alignment.recipe import RewardHackingConfig

    rows = [{"step": s + 1, "reward/mean": 1.0, "kl/ref": 12.0 + (0.5 if s % 2 else -0.5)} for s in range(20)]
    found = {}
    for budget in (10.0, 20.0):
        recipe, run_dir = ppo_run(tmp_path / str(budget), reward_hacking=RewardHackingConfig(kl_budget=budget))
        write_jsonl(run_dir / "ppo" / "metrics.jsonl", rows)
        found[budget] = [a for a in reward_hacking_alarms(recipe, run_dir) if a.kind == "kl_budget"]
    assert found[20.0] == []
    [alarm] = found[10.0]
    assert alarm.kind == "kl_budget" and alarm.message.startswith(
        "ppo: the KL to the reference left its budget -- 12.1 ± 0.2449 nats per sequence (mean of the last 5 logged "
        "steps) against reward_hacking.kl_budget 10.")


def test_kl_per_sequence_from_grpo_per_token_kl():
    rows = [{"kl/ref_per_token": 0.5, "response/length_mean": 8.0}] * 8 + [{"loss": 1.0}]
    mean, se, n = kl_level(rows)
    assert (mean, se, n) == (4.0, 0.0, 2)


def test_estimates():
    assert reward_rise(rising(0, 1, steps=7)) is None  # under two steps per quarter: no variance, no claim
    rise = reward_rise([{"reward/mean": v} for v in [1, 2, 1, 2, 5, 6, 5, 6]])
    # quarters [1, 2] and [5, 6]: each variance 0.5 over 2 steps, SE = sqrt(0.25 + 0.25)
    assert (rise.before, rise.after, rise.n) == (1.5, 5.5, 2) and rise.se == pytest.approx(0.5 ** 0.5)
    assert rise.z == pytest.approx(4 / 0.5 ** 0.5) and rise.text() == "1.5 → 5.5 (+4 ± 0.7071, 5.7 SE)"
    unpaired = eval_change(accuracy([1.0, 0.0]), accuracy([1.0, 1.0, 0.0]), "accuracy")
    assert not unpaired.paired and unpaired.se == pytest.approx((0.5 / 2 + (1 / 3) / 3) ** 0.5)
    assert eval_change({"metrics": {"accuracy": 0.5}}, {"metrics": {"accuracy": 0.6}}, "accuracy").se is None
    assert Change(1.0, 1.0, 0.0, 3).z == 0.0


def test_the_summary_and_the_report_say_so(tmp_path, capsys):
    from alignment.cli import _print_alarms
    from evals.report import write_report

    recipe, run_dir = ppo_run(tmp_path)
    _print_alarms(recipe, run_dir)
    assert "warning: ppo: possible reward hacking" in capsys.readouterr().out
    report = write_report(run_dir)
    assert "## Warnings\n\n- **ppo: possible reward hacking" in (report.parent / "report.md").read_text()
    assert "<section id='warnings'>" in report.read_text()
