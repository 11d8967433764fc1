"""Issue 16, kind 5: what an eval process builds must not depend on what ran before in it. vLLM (0.32) serves
GPT-NeoX through its Transformers backend, which decorated transformers' `GPTNeoXModel` in place: once base had
been evaluated with the in-process vLLM engine, merging the next stage's adapter in the same process failed
with `Current vLLM config is not set`."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from alignment.rundir import RunDir
from alignment.testing import make_tiny_gpt_neox, make_tokenizer
from tests.helpers import manifest, pair_rows, run_cli, sum_rows, write_jsonl, write_recipe

pytestmark = pytest.mark.vllm

AFTER_VLLM = """
import sys
from alignment.models import merge_adapter
from alignment.rollout import SamplingConfig, make_engine

if __name__ == "__main__":
    base, adapter = sys.argv[1:]
    engine = make_engine("vllm", base, max_model_len=64)
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    first = engine.generate([[5, 6, 7]], greedy)[0][0].completion_ids
    merge_adapter(adapter)  # while the engine is open
    assert engine.generate([[5, 6, 7]], greedy)[0][0].completion_ids == first  # the engine still works
    engine.close()
    merge_adapter(adapter)  # and after it is closed
    print("merged after vLLM", flush=True)
"""


def test_an_adapter_merges_in_a_process_where_vllm_served_its_gpt_neox_base(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.models import ARTIFACT_FILE

    base = make_tiny_gpt_neox(tmp_path / "neox")
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4)).save_pretrained(adapter)
    make_tokenizer().save_pretrained(adapter)
    (adapter / ARTIFACT_FILE).write_text(json.dumps({"kind": "adapter", "base": str(base), "head": "causal_lm"}))
    out = subprocess.run([sys.executable, "-c", AFTER_VLLM, str(base), str(adapter)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "merged after vLLM" in out.stdout, out.stderr[-3000:]

STEPS = {"max_steps": 2, "save_steps": 100, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3}


@pytest.mark.slow  # 2-3 min here (11 min with the machine 5x oversubscribed)
def test_every_stage_of_a_gpt_neox_adapter_chain_is_evaluated_after_a_vllm_eval(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    model = make_tiny_gpt_neox(tmp_path / "neox")
    prompts = [{"prompt": r["prompt"], "answer": r["completion"][0]["content"]} for r in sum_rows(4, seed=1)]
    data = {n: {"path": f"{n}.jsonl"} for n in ("sft", "pairs", "prompts")}
    for name, rows in (("sft", sum_rows(8)), ("pairs", pair_rows(8)), ("prompts", prompts)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    stages = {
        "sft": {"method": "sft", "data": ["sft"], "args": STEPS},
        "dpo": {"method": "dpo", "from": "sft", "data": ["pairs"], "args": {**STEPS, "beta": 0.1}},
        "grpo": {"method": "grpo", "from": "dpo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_grpo.sevens"}],
                 "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 4}, "args": {**STEPS, "beta": 0.0}},
    }
    evals = [{"task": "accuracy", "data": "prompts", "args": {"backend": "vllm", "max_new_tokens": 4}}]
    recipe = write_recipe(tmp_path, model, stages, data=data, evals=evals,
                          model={"adapter": {"method": "lora", "r": 4, "alpha": 8}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = RunDir(tmp_path / "runs" / "t")
    for stage in ("base", "sft", "dpo", "grpo"):  # every stage's adapter merged after vLLM ran in the process
        if stage != "base":
            assert manifest(run_dir.path, stage)["status"] == "done"
        assert "accuracy" in str(run_dir.read_evals(stage)["tasks"]), stage
