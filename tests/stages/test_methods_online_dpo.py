"""Online DPO on the tiny model: pairs sampled from the policy and judged on the fly by a reward function (a toy
task a random model has signal on: write lowercase letters) are learned on a fixed seed (full fine-tuning,
reference = TRL's frozen copy; adapters go through the same ctx.peft_config as dpo's); the experimental TRL classes
are pinned; bad inputs are refused at validate time."""
from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from tests.helpers import manifest, metrics, pair_rows, run_cli, write_jsonl, write_recipe

LOWERCASE = "tests.stages.test_methods_online_dpo.lowercase"


def lowercase(prompts, completions, **columns):
    """Share of the completion's characters that are lowercase letters (~1/4 for the random tiny model)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.islower() for ch in t) / max(len(t), 1) for t in texts]


def odpo_recipe(tmp_path, model_path, **stage):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(16)])
    stages = {"odpo": {
        "method": "online_dpo", "data": ["prompts"], "rewards": [{"name": LOWERCASE}],
        "rollout": {"max_new_tokens": 8, "temperature": 1.0},
        "args": {"learning_rate": 1.0e-2, "max_steps": 12, "save_steps": 100, "beta": 0.1,
                 "per_device_train_batch_size": 16},
        **stage,
    }}
    return write_recipe(tmp_path, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})


def test_trl_experimental_online_dpo_is_where_the_stage_imports_it():
    """TRL's experimental API may move between versions: an upgrade that moves it fails here first."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: F401

    assert {"max_new_tokens", "temperature", "top_p", "top_k", "reward_weights", "beta", "loss_type"} <= set(
        OnlineDPOConfig.__dataclass_fields__)
    assert "reward_funcs" in OnlineDPOTrainer.__init__.__code__.co_varnames


def test_online_dpo_raises_the_judged_reward(tmp_path, tiny_model_path):
    res = run_cli(odpo_recipe(tmp_path, tiny_model_path), "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    rows = metrics(run_dir, "odpo")
    curve = [m["reward/mean"] for m in rows if "reward/mean" in m]
    assert len(curve) == 12
    # TRL's keys arrive renamed to the vocabulary's (alignment/metrics.py)
    for ours, trl in [("reward/mean", "objective/scores"), ("reward/pair_margin", "objective/scores_margin"),
                      ("kl/ref", "objective/kl"), ("kl/coef", "beta")]:
        assert ours in rows[0] and trl not in rows[0], (ours, sorted(rows[0]))
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.1, curve  # measured: 0.27 -> 0.53
    loss = [m["loss"] for m in rows if "loss" in m]  # the DPO loss on the judged pairs
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, loss
    man = manifest(run_dir, "odpo")
    assert man["info"]["rollout_backend"] == "hf" and man["trainer_config"]["max_new_tokens"] == 8


def _validate(recipe):
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    return res.exit_code, " ".join(res.output.split())


def test_pairs_instead_of_prompts_are_refused_with_file_line_and_columns(tmp_path, tiny_model_path):
    recipe = odpo_recipe(tmp_path, tiny_model_path)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in pair_rows(3)])
    code, out = _validate(recipe)
    assert code == 2 and f"{data}:1:" in out and "expected prompt" in out, out


@pytest.mark.parametrize("stage, message", [
    ({"rewards": []}, "stages.odpo.rewards: online_dpo needs at least one reward"),
    ({"rollout": {"backend": "vllm"}}, "stages.odpo.rollout.backend: online_dpo samples with TRL's own generate"),
    ({"rollout": {"num_generations": 4}}, "stages.odpo.rollout.num_generations: online_dpo samples exactly 2"),
])
def test_bad_settings_are_refused_with_the_recipe_key(tmp_path, tiny_model_path, stage, message):
    code, out = _validate(odpo_recipe(tmp_path, tiny_model_path, **stage))
    assert code == 2 and message in out, out


@pytest.mark.slow  # three stages: 7 min wall with this machine oversubscribed
def test_online_dpo_judged_by_an_earlier_reward_model_stage(tmp_path, tiny_model_path):
    """Issue 18: sft -> rm (a `reward` stage on preference pairs) -> online_dpo whose pairs the rm judges, with
    LoRA; each stage ends done and every online_dpo step logs the rm's scores of the sampled pairs."""
    from tests.helpers import sum_rows

    write_jsonl(tmp_path / "sft.jsonl", sum_rows(8))
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sum_rows(8, seed=1)])
    data = {n: {"path": f"{n}.jsonl"} for n in ("sft", "pairs", "prompts")}
    common = {"per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1.0e-3, "save_steps": 100}
    stages = {
        "sft": {"method": "sft", "data": ["sft"], "args": common},
        "rm": {"method": "reward", "from": "sft", "data": ["pairs"], "args": common},
        "odpo": {"method": "online_dpo", "from": "sft", "data": ["prompts"],
                 "rewards": [{"name": "reward_model", "stage": "rm"}],
                 "rollout": {"max_new_tokens": 4}, "args": {**common, "beta": 0.1}},
    }
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data=data,
                          model={"adapter": {"method": "lora", "r": 4, "alpha": 8}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    assert [manifest(run_dir, s)["status"] for s in stages] == ["done"] * 3
    rows = [m for m in metrics(run_dir, "odpo") if "reward/mean" in m]
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:  # the rm scored every sampled completion, and told the two of each pair apart
        assert m["reward/reward_model/missing"] == 0 and math.isfinite(m["reward/mean"]), m
        assert m["reward/pair_margin"] > 0, m
