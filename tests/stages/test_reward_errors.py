"""Issue 16 kind 4: a reward that breaks its contract in a way no score can stand for -- the wrong number of scores,
or a string instead of a list -- stops its stage in GRPO, RLOO and PPO alike with exit 2 and one line naming the
reward, never a traceback from inside the trainer followed by advice to rerun."""
from __future__ import annotations

import pytest

from tests.helpers import run_cli, write_jsonl, write_recipe

REWARDS = {
    "short": ("def score(prompts, completions, **kw):\n    return [1.0] * (len(completions) - 1)\n",
              "reward 'bad_rewards.score' returned {n} scores for {m} completions"),
    "text": ("def score(prompts, completions, **kw):\n    return 'good'\n",
             "reward 'bad_rewards.score' returned str; expected a list of one score per completion"),
}
ROLLOUT = {"backend": "hf", "num_generations": 2, "max_new_tokens": 4}
ARGS = {"max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 100}


@pytest.mark.parametrize("method, reward", [
    ("grpo", "short"), ("grpo", "text"),
    pytest.param("rloo", "short", marks=pytest.mark.slow), pytest.param("ppo", "short", marks=pytest.mark.slow),
    pytest.param("ppo", "text", marks=pytest.mark.slow),
])
def test_a_reward_returning_the_wrong_shape_stops_the_stage_naming_it(tmp_path, tiny_model_path, method, reward,
                                                                       capfd):
    module, says = REWARDS[reward]
    (tmp_path / "bad_rewards.py").write_text(module)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)])
    stage = {"method": method, "data": ["prompts"], "rewards": [{"name": "bad_rewards.score"}], "rollout": ROLLOUT,
             "args": ARGS}
    recipe = write_recipe(tmp_path, tiny_model_path, {method: stage}, data={"prompts": {"path": "prompts.jsonl"}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 2, res.output
    first = says.split("{")[0]
    assert first in res.output and "Traceback" not in res.output and "rerun" not in res.output, res.output
    child = capfd.readouterr()  # the stage process's own output
    assert "Traceback" not in child.out + child.err, child.err[-2000:]
