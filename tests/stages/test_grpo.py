"""GRPO on the tiny model: reward rises on a toy task (emit the character '7'), with HF and with
vLLM rollouts (the policy's weights are synced into vLLM after every step)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from alignment.cli import _headline
from tests.helpers import metrics, run_cli, write_jsonl, write_recipe


def sevens(prompts, completions, **columns):
    """Share of the completion's characters that are '7' (a reward a random model finds)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


def grpo_recipe(tmp_path, model_path, backend):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(16)])
    stages = {"grpo": {
        "method": "grpo", "data": ["prompts"],
        "rewards": [{"name": "tests.stages.test_grpo.sevens"}],
        "rollout": {"backend": backend, "num_generations": 8, "max_new_tokens": 8, "temperature": 1.0},
        "args": {"learning_rate": 1.0e-2, "max_steps": 12, "save_steps": 100, "beta": 0.0},
    }}
    return write_recipe(tmp_path, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})


def reward_curve(run_dir):
    return [m["reward/mean"] for m in metrics(run_dir, "grpo") if "reward/mean" in m]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_grpo_raises_reward(tmp_path, tiny_model_path, backend):
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    recipe = grpo_recipe(tmp_path, tiny_model_path, backend)
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    curve = reward_curve(run_dir)
    assert len(curve) == 12
    # TRL's keys arrive renamed to the vocabulary's (alignment/metrics.py), as ppo logs them
    row = metrics(run_dir, "grpo")[0]
    sevens = "tests.stages.test_grpo.sevens"  # TRL names a reward by its __name__: the recipe's name
    for ours, trl in [("reward/std", "reward_std"), (f"reward/{sevens}/mean", f"rewards/{sevens}/mean"),
                      ("response/length_mean", "completions/mean_length"), ("timing/step", "step_time")]:
        assert ours in row and trl not in row, (ours, sorted(row))
    assert sum(curve[-3:]) / 3 > 2 * sum(curve[:3]) / 3 + 0.02, curve
    man = json.loads((run_dir / "grpo" / "manifest.json").read_text())
    assert man["info"]["rollout_backend"] == backend
    # the quarters the summary prints come from the same log
    assert man["metrics"]["reward/first_quarter"] == pytest.approx(sum(curve[:3]) / 3)
    assert man["metrics"]["reward/last_quarter"] == pytest.approx(sum(curve[-3:]) / 3)
    first, last = man["metrics"]["reward/first_quarter"], man["metrics"]["reward/last_quarter"]
    assert _headline(man["metrics"]) == f"reward {first:.3g} → {last:.3g}" and "summary" in res.output


def test_a_reward_that_loses_every_score_stops_the_stage_naming_it(tmp_path, tiny_model_path):
    """Issue 16, kind 4: a reward returning NaN for every completion used to let GRPO finish 'done' with loss 0,
    having trained on nothing; now the stage stops after `max_missing_reward_steps` such steps, exit 2."""
    (tmp_path / "broken.py").write_text("def always_nan(prompts, completions, **kw):\n"
                                        "    return [float('nan')] * len(completions)\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}"} for i in range(8)])
    recipe = write_recipe(tmp_path, tiny_model_path, {"grpo": {
        "method": "grpo", "data": ["prompts"], "rewards": [{"name": "broken.always_nan"}], "max_missing_reward_steps": 2,
        "rollout": {"backend": "hf", "num_generations": 4, "max_new_tokens": 4},
        "args": {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 1, "beta": 0.0}}},
        data={"prompts": {"path": "prompts.jsonl"}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 2, res.output
    assert ("stage 'grpo' stopped: every reward ('broken.always_nan') lost every score for 2 steps in a row, "
            "up to step 2") in res.output
    assert "resume" not in res.output and "Traceback" not in res.output
    run_dir = tmp_path / "runs" / "t"
    man = json.loads((run_dir / "grpo" / "manifest.json").read_text())
    assert man["status"] == "failed" and man["exit_code"] == 2
    assert (run_dir / "grpo" / "checkpoints" / "checkpoint-1").is_dir()  # the last checkpoint is kept
