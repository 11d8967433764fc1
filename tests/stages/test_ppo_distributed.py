"""PPO on two processes (gloo on CPU), launched as the orchestrator launches a `launch: {num_processes: 2}` stage:
`python -m torch.distributed.run --nproc_per_node 2 -m alignment.stage RUN_DIR ppo`. Two ranks with the global
batch of one process train the same curve; rank 0 alone writes the artifact and one metrics line per update; a
rank killed with SIGKILL mid-stage leaves a checkpoint every rank resumes from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.recipe import RecipeError
from alignment.rundir import RunDir
from alignment.validate import load_recipe
from tests.helpers import metrics, write_jsonl, write_recipe

ROOT = Path(__file__).resolve().parents[2]
LORA = {"adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}


def prepare(folder: Path, model_path, args: dict, *, model: dict | None = None) -> Path:
    """A run directory holding the resolved recipe of one ppo stage (what `alignkit run` writes before it
    launches the stage): 16 prompts, 2 completions each, hf rollouts."""
    write_jsonl(folder / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(16)])
    stages = {"ppo": {"method": "ppo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
                      "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 8}, "args": args}}
    recipe = write_recipe(folder, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}},
                          **({"model": model} if model else {}))
    run_dir = folder / "runs" / "t"
    RunDir(run_dir).write_recipe(load_recipe(recipe))
    return run_dir


def command(run_dir: Path, nproc: int) -> list[str]:
    stage = ["-m", "alignment.stage", str(run_dir), "ppo"]
    if nproc == 1:
        return [sys.executable, *stage]
    # --standalone: a free rendezvous port, so parallel test runs do not collide on 29500
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *stage]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def launch(run_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, nproc), env=env(), cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=600)


# same global batch: 8 sequences (4 prompts x 2) per update, one minibatch, two epochs over it
CURVE = {"learning_rate": 1e-2, "max_steps": 3, "num_mini_batches": 1, "num_ppo_epochs": 2, "save_steps": 100,
         "rollout_seed_per_prompt": True}
COMPARED = ("reward/mean", "kl/ref", "policy/loss", "value/loss", "adv/std", "value/explained_var", "grad_norm",
            "response/length_mean", "policy/clipfrac")


def test_two_processes_train_the_curve_of_one_with_the_same_global_batch(tmp_path, tiny_model_path):
    one = prepare(tmp_path / "one", tiny_model_path, {**CURVE, "per_device_train_batch_size": 8}, model=LORA)
    two = prepare(tmp_path / "two", tiny_model_path, {**CURVE, "per_device_train_batch_size": 4}, model=LORA)
    for run_dir, nproc in ((one, 1), (two, 2)):
        res = launch(run_dir, nproc)
        assert res.returncode == 0, res.stderr[-3000:]
    single, double = metrics(one, "ppo"), metrics(two, "ppo")
    # one metrics line per update, written by rank 0 alone
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2, 3]
    # Per-prompt seeds make the samples the same at any layout; what differs is float summation order (each
    # rank pads to its own longest row; the reductions add sums of sums): ~1e-7 relative per op, measured up to
    # 8e-6 relative (policy/loss) after three AdamW updates at LR 1e-2. Tolerance 1e-4 relative (1e-6 absolute,
    # for numbers near 0): a rank-local whitening or loss normaliser is off by 1e-2 and more.
    for a, b in zip(single, double):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    assert single[-1]["kl/ref"] > 1e-3  # the policy moved: the curves compare training, not a constant
    # one artifact, written once by the main process
    model = two / "ppo" / "model"
    assert sorted(p.name for p in model.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors", "alignkit_model.json", "tokenizer.json", "tokenizer_config.json"]
    assert not (two / "ppo" / "model.tmp").exists() and (two / "ppo" / "result.json").exists()


def test_a_rank_killed_mid_stage_resumes_from_the_last_checkpoint(tmp_path, tiny_model_path):
    """Full fine-tuning with a separate critic (both DDP-wrapped); rank 1 kills itself (SIGKILL, the fault hook
    `ALIGNKIT_FAULT_KILL_AFTER_SAVE`) once checkpoint-2 is complete; the launcher fails; the rerun resumes every
    rank from checkpoint-2 and logs updates 3..4 once."""
    run_dir = prepare(tmp_path, tiny_model_path, {"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 4,
                                                  "critic": "separate", "save_steps": 2})
    killed = subprocess.run(command(run_dir, 2), env={**env(), "ALIGNKIT_FAULT_KILL_AFTER_SAVE": "2", "ALIGNKIT_FAULT_RANK": "1"},
                            cwd=run_dir.parent, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (run_dir / "ppo" / "model").exists()
    assert [r["step"] for r in metrics(run_dir, "ppo")][:2] == [1, 2]
    assert (run_dir / "ppo" / "checkpoints" / "checkpoint-2" / "critic" / "model.safetensors").exists()

    res = launch(run_dir, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming ppo from checkpoint-2" in res.stdout
    assert [r["step"] for r in metrics(run_dir, "ppo")] == [1, 2, 3, 4]
    assert (run_dir / "ppo" / "model" / "model.safetensors").exists()


def test_validate_takes_ppo_on_two_processes_with_hf_rollouts(tmp_path, tiny_model_path):
    """`launch: {num_processes: 2}` validates with hf rollouts (each rank generates its shard); other engines
    are refused at the rollout key until they are wired across processes."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say 1:"}])

    def recipe(backend):
        stages = {"ppo": {"method": "ppo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
                          "rollout": {"backend": backend, "num_generations": 2}, "launch": {"num_processes": 2},
                          "args": {"per_device_train_batch_size": 4}}}
        return write_recipe(tmp_path, tiny_model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})

    assert load_recipe(recipe("hf")).stage_launch("ppo").num_processes == 2
    with pytest.raises(RecipeError, match=r"stages.ppo.rollout.backend: ppo on several processes generates on every "
                                          r"rank with the hf engine; 'vllm' rollouts"):
        load_recipe(recipe("vllm"))
