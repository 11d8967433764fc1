"""RLOO on the tiny model: reward rises on grpo's toy task (emit the character '7'), with HF and with vLLM rollouts
through our engines (the policy's weights synced after every step); the seam of TRL 1.16's RLOOTrainer our engine
plugs into is pinned; bad inputs are refused at validate time."""
from __future__ import annotations

import importlib.util
import inspect
import json

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from tests.helpers import metrics, pair_rows, run_cli, write_jsonl, write_recipe

SEVENS = "tests.stages.test_grpo.sevens"  # share of a completion's characters that are '7'


def rloo_recipe(tmp_path, model_path, backend, **stage):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(16)])
    stages = {"rloo": {
        "method": "rloo", "data": ["prompts"], "rewards": [{"name": SEVENS}],
        "rollout": {"backend": backend, "num_generations": 8, "max_new_tokens": 8, "temperature": 1.0},
        "args": {"learning_rate": 1.0e-2, "max_steps": 12, "save_steps": 100, "beta": 0.0}, **stage,
    }}
    return write_recipe(tmp_path, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})


def test_trl_rloo_generation_seam_is_where_the_stage_plugs_in():
    """The stage hands RLOOTrainer our engine as its vLLM generation backend: an upgrade that moves that seam fails
    here first."""
    from trl import RLOOConfig, RLOOTrainer

    init, generate = inspect.getsource(RLOOTrainer.__init__), inspect.getsource(RLOOTrainer._generate_single_turn)
    assert "self.use_vllm = args.use_vllm" in init
    assert "if self.use_vllm:" in generate and "self._last_loaded_step" in generate
    assert "self.vllm_generation.sync_weights()" in generate
    assert "_, completion_ids, _, _ = self.vllm_generation.generate(" in generate
    assert {"num_generations", "beta", "max_completion_length", "reward_weights"} <= set(RLOOConfig.__dataclass_fields__)


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_rloo_raises_reward(tmp_path, tiny_model_path, backend):
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    res = run_cli(rloo_recipe(tmp_path, tiny_model_path, backend), "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    rows = metrics(run_dir, "rloo")
    curve = [m["reward/mean"] for m in rows if "reward/mean" in m]
    assert len(curve) == 12
    for ours, trl in [("reward/std", "reward_std"), (f"reward/{SEVENS}/mean", f"rewards/{SEVENS}/mean"),
                      ("response/length_mean", "completions/mean_length"), ("policy/entropy", "entropy")]:
        assert ours in rows[0] and trl not in rows[0], (ours, sorted(rows[0]))
    assert sum(curve[-3:]) / 3 > 2 * sum(curve[:3]) / 3 + 0.02, curve
    man = json.loads((run_dir / "rloo" / "manifest.json").read_text())
    assert man["info"]["rollout_backend"] == backend
    assert man["trainer_config"]["num_generations"] == 8 and man["trainer_config"]["max_completion_length"] == 8


def _validate(recipe):
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    return res.exit_code, " ".join(res.output.split())


def test_pairs_instead_of_prompts_are_refused_with_file_line_and_columns(tmp_path, tiny_model_path):
    recipe = rloo_recipe(tmp_path, tiny_model_path, "hf")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in pair_rows(3)])
    code, out = _validate(recipe)
    assert code == 2 and f"{data}:1:" in out and "expected prompt" in out, out


def test_no_rewards_is_refused_with_the_recipe_line(tmp_path, tiny_model_path):
    code, out = _validate(rloo_recipe(tmp_path, tiny_model_path, "hf", rewards=[]))
    assert code == 2 and "stages.rloo.rewards" in out and "rloo needs at least one reward" in out, out
