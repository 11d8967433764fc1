"""Issue 16 kind 3 (shared case 16): the same stage forced to run again -- same recipe, seed and inputs -- gives
bit-identical weights, for every method, chained from an SFT adapter (its merged base built by the first run and
found by the rerun). One run of all stages, then `--stage M --force` per method."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import run_cli, sum_rows, write_jsonl, write_recipe

pytestmark = pytest.mark.slow  # the whole recipe (12 stages), then one forced rerun per method: ~10 min here

ARGS = {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100, "learning_rate": 1e-3}
ROLLOUT = {"backend": "hf", "num_generations": 2, "max_new_tokens": 4}
REWARDS = [{"name": "math_accuracy"}]
STAGES = {
    "sft": {"method": "sft", "data": ["sft"], "args": ARGS},
    "reward": {"method": "reward", "data": ["pairs"], "args": ARGS},
    "dpo": {"method": "dpo", "data": ["pairs"], "args": ARGS},
    "kto": {"method": "kto", "data": ["kto"], "args": ARGS},
    "orpo": {"method": "orpo", "data": ["pairs"], "args": ARGS},
    "cpo": {"method": "cpo", "data": ["pairs"], "args": ARGS},
    "simpo": {"method": "simpo", "data": ["pairs"], "args": ARGS},
    "grpo": {"method": "grpo", "data": ["prompts"], "rewards": REWARDS, "rollout": ROLLOUT, "args": ARGS},
    "rloo": {"method": "rloo", "data": ["prompts"], "rewards": REWARDS, "rollout": ROLLOUT, "args": ARGS},
    "online_dpo": {"method": "online_dpo", "data": ["prompts"], "rewards": REWARDS,
                   "rollout": {**ROLLOUT, "num_generations": 2}, "args": ARGS},
    "ppo": {"method": "ppo", "data": ["prompts"], "rewards": REWARDS, "rollout": ROLLOUT,
            "args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_mini_batches": 1, "num_ppo_epochs": 1,
                     "save_steps": 100, "learning_rate": 1e-3}},
    "distill": {"method": "distill", "data": ["sft"], "teacher": "base", "args": ARGS},
}
METHODS = [m for m in STAGES if m != "sft"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("rerun")
    rows = sum_rows(16)
    write_jsonl(tmp / "sft.jsonl", rows)
    write_jsonl(tmp / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                       "rejected": [{"role": "assistant", "content": "?"}]} for r in rows])
    write_jsonl(tmp / "kto.jsonl", [{"prompt": r["prompt"], "completion": c, "label": label} for r in rows
                                    for c, label in ((r["completion"], True), ([{"role": "assistant", "content": "?"}], False))])
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": r["prompt"], "answer": r["completion"][0]["content"]} for r in rows])
    stages = {"sft": STAGES["sft"], **{m: {**STAGES[m], "from": "sft"} for m in METHODS}}
    recipe = write_recipe(tmp, tiny_model_path, stages, model={"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}},
                          data={n: {"path": f"{n}.jsonl"} for n in ("sft", "pairs", "kto", "prompts")})
    res = run_cli(recipe, "--run-dir", tmp / "runs")
    assert res.exit_code == 0, res.output
    return recipe, tmp / "runs", tmp / "runs" / "t"


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", METHODS)
def test_a_forced_rerun_gives_bit_identical_weights(run, method):
    recipe, runs, run_dir = run
    first = weights(run_dir / method / "model")
    shutil.rmtree(run_dir / method / "merged", ignore_errors=True)  # a merged copy of its own, if any: rebuilt
    res = run_cli(recipe, "--run-dir", runs, "--stage", method, "--force")
    assert res.exit_code == 0 and "rerunning from scratch (forced)" in res.output, res.output
    again = weights(run_dir / method / "model")
    assert first.keys() == again.keys()
    differ = [k for k in first if not torch.equal(first[k], again[k])]
    assert not differ, f"{method}: {len(differ)} of {len(first)} tensors differ after a forced rerun, e.g. {differ[:3]}"
