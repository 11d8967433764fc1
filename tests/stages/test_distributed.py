"""Stages past one process, on CPU: `launch: {num_processes: 2}` runs a stage as two gloo ranks under
`torch.distributed.run`. With the same global batch (per_device_train_batch_size x processes x
gradient_accumulation_steps) two processes give the one-process loss curve; rank 0 alone writes the artifact,
result.json and one metrics line per step; kill -9 of one rank, then a rerun, resumes and finishes; two
orchestrators acting as two machines (loopback) finish a stage with one artifact and one manifest.

Each two-process run is a few steps of the tiny model: this 2-core machine runs CI.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignment.pipeline import Machines, Pipeline
from alignment.validate import load_recipe
from tests.helpers import losses, manifest, metrics, pair_rows, run_cli, write_jsonl, write_recipe

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

# float32 on CPU: the 1-process and 2-process runs sum the same per-token losses in another order (gloo's
# all-reduce vs gradient accumulation), so the curves agree to rounding -- measured ~1e-6 relative.
LOSS_RTOL = 1e-4


def two_ways(tmp_path, model_path, stages_for, *, data=None) -> tuple[Path, Path]:
    """Run the recipe once as 1 process (`stages_for(1)`) and once as 2 (`stages_for(2)`); their run dirs.
    Each run's `sevens` reward records the prompts it scores in `nN/scored.jsonl`."""
    out = []
    for n in (1, 2):
        folder = tmp_path / f"n{n}"
        if data is not None:
            for name, rows in data.items():
                write_jsonl(folder / f"{name}.jsonl", rows)
        recipe = write_recipe(folder, model_path, stages_for(n),
                              data={k: {"path": f"{k}.jsonl"} for k in data} if data else None,
                              **({"launch": {"num_processes": 2}} if n == 2 else {}))
        res = run_cli(recipe, "--run-dir", folder / "runs", env={"ALIGNKIT_TEST_PROMPT_LOG": str(folder / "scored.jsonl")})
        assert res.exit_code == 0, res.output
        out.append(folder / "runs" / "t")
    return out[0], out[1]


def assert_one_writer(run_dir: Path, stage: str, steps: int) -> None:
    """One artifact (full weights or an adapter), one result with world size 2, one metrics line per step."""
    weights = [p.name for p in (run_dir / stage / "model").glob("*.safetensors")]
    assert weights in (["model.safetensors"], ["adapter_model.safetensors"]), weights
    assert not list((run_dir / stage).glob("model.tmp*"))
    assert manifest(run_dir, stage)["info"]["world_size"] == 2
    assert [row["step"] for row in metrics(run_dir, stage) if "loss" in row] == list(range(1, steps + 1))


# ---------------------------------------------------------------- the launcher, without launching


def pipeline(tmp_path, model_path, launch: dict | None, machines: Machines = Machines()) -> Pipeline:
    recipe = write_recipe(tmp_path, model_path, {"sft": {"method": "sft", "data": ["sft"]}},
                          **({"launch": launch} if launch else {}))
    return Pipeline(load_recipe(recipe), tmp_path / "runs", machines=machines)


def command(tmp_path, model_path, launch: dict | None, machines: Machines = Machines()) -> list[str]:
    return pipeline(tmp_path, model_path, launch, machines).command("sft")


def test_the_launcher_follows_the_recipe_and_the_machines(tmp_path, tiny_model_path, monkeypatch):
    entry = ["-m", "alignment.stage", str(tmp_path / "runs" / "t"), "sft"]
    assert command(tmp_path, tiny_model_path, None) == [sys.executable, *entry]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert command(tmp_path, tiny_model_path, {"num_processes": 2}) == [*torchrun, "--standalone", *entry]
    two = Machines(num=2, rank=1, main_ip="10.0.0.1", main_port=29600)
    assert command(tmp_path, tiny_model_path, {"num_processes": 2}, two) == [
        *torchrun, "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29600", *entry]
    config = REPO / "recipes" / "accelerate" / "zero3.yaml"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    assert command(tmp_path, tiny_model_path, {"accelerate_config": str(config), "num_processes": 8}, two) == [
        *accelerate, "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29600", *entry]
    gpus = pipeline(tmp_path, tiny_model_path, {"num_processes": 8})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # GPUs without a config file: DDP
    assert gpus.command("sft") == [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "8", "--multi_gpu", *entry]


def test_machines_come_from_the_flags_or_slurm():
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert Machines.from_env(slurm) == Machines(2, 1, "gpu07", 29500)
    assert Machines.from_env(slurm, rank=0, main_ip="h0", main_port=1234) == Machines(2, 0, "h0", 1234)
    assert Machines.from_env({}) == Machines()
    with pytest.raises(ValueError, match="--main-process-ip"):
        Machines.from_env({}, num=2, rank=1)
    with pytest.raises(ValueError, match="outside 0..1"):
        Machines.from_env({}, num=2, rank=2, main_ip="h0")


def test_only_the_main_process_writes_metrics_and_artifacts(tmp_path, tiny_model_path, monkeypatch):
    from alignment.stages import StageContext

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}}))
    ctx = StageContext(recipe=recipe, name="sft", run_dir=tmp_path / "run")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not ctx.is_main_process and ctx.world_size == 2
    ctx.log_metrics(1, {"loss": 1.0})
    ctx.save_model(model=None, tokenizer=None)  # returns before touching either
    ctx.progress(10).update(1, {"loss": 1.0})
    assert not ctx.rundir.metrics_file("sft").exists() and not ctx.rundir.model_dir("sft").exists()
    monkeypatch.setenv("RANK", "0")
    ctx.log_metrics(1, {"loss": 1.0})
    assert [row["loss"] for row in ctx.rundir.read_metrics("sft")] == [1.0]


# ---------------------------------------------------------------- equivalence, one writer, resume


def test_sft_on_two_processes_matches_one_and_a_killed_rank_resumes(tmp_path, tiny_model_path):
    """Global batch 8 both ways: 1 process x 4 rows x 2 accumulation steps, 2 processes x 4 rows x 1. The
    2-process run loses rank 1 (kill -9) right after checkpoint-2; the rerun resumes from it."""
    def sft(n):
        return {"sft": {"method": "sft", "data": ["sft"], "args": {
            "learning_rate": 3.0e-3, "max_steps": 4, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2 // n, "save_steps": 2}}}

    one = tmp_path / "n1"
    res = run_cli(write_recipe(one, tiny_model_path, sft(1)), "--run-dir", one / "runs")
    assert res.exit_code == 0, res.output
    two = tmp_path / "n2"
    recipe = write_recipe(two, tiny_model_path, sft(2), launch={"num_processes": 2})
    res = run_cli(recipe, "--run-dir", two / "runs", env={"ALIGNKIT_FAULT_KILL_AFTER_SAVE": "2", "ALIGNKIT_FAULT_RANK": "1"})
    assert res.exit_code == 1 and "failed" in res.output, res.output
    run_dir = two / "runs" / "t"
    assert manifest(run_dir, "sft")["status"] == "failed" and not (run_dir / "sft" / "model").exists()
    res = run_cli(recipe, "--run-dir", two / "runs")
    assert res.exit_code == 0, res.output
    assert "resuming sft" in res.output and manifest(run_dir, "sft")["resumed"] is True
    assert_one_writer(run_dir, "sft", 4)
    assert losses(run_dir, "sft") == pytest.approx(losses(one / "runs" / "t", "sft"), rel=LOSS_RTOL)


def test_dpo_on_two_processes_matches_one(tmp_path, tiny_model_path):
    def dpo(n):
        return {"dpo": {"method": "dpo", "data": ["pairs"], "args": {
            "learning_rate": 1.0e-3, "max_steps": 3, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2 // n, "beta": 0.1}}}

    one, two = two_ways(tmp_path, tiny_model_path, dpo, data={"pairs": pair_rows(32)})
    assert_one_writer(two, "dpo", 3)
    assert losses(two, "dpo") == pytest.approx(losses(one, "dpo"), rel=LOSS_RTOL)
    assert losses(two, "dpo", "rewards/margins") == pytest.approx(losses(one, "dpo", "rewards/margins"), rel=1e-3, abs=1e-6)


def sevens(prompts, completions, trainer_state=None, **columns):
    """Share of '7's in each completion; with ALIGNKIT_TEST_PROMPT_LOG set, each (step, prompt) scored is appended
    there (from every rank), so a test can see which prompts a step trained on."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    if os.environ.get("ALIGNKIT_TEST_PROMPT_LOG"):
        with open(os.environ["ALIGNKIT_TEST_PROMPT_LOG"], "a") as fh:
            fh.write("".join(json.dumps([trainer_state.global_step, p[-1]["content"]]) + "\n" for p in prompts))
    return [t.count("7") / max(len(t), 1) for t in texts]


def test_grpo_on_two_processes_keeps_the_global_batch(tmp_path, tiny_model_path):
    """Global batch 8 completions (2 prompts x 4) per step both ways: each step scores the same prompts, split
    over the ranks -- the exact check. Each rank samples with its own seed (TRL seeds generation per device), so
    completions, rewards and losses differ from the 1-process run by sampling noise: the mean reward over the
    run agrees within 0.1 and each step's loss within 0.05 (a weak check: on-policy GRPO's loss is near 0
    whenever a group's completions have equal lengths)."""
    from collections import Counter

    def grpo(n):
        return {"grpo": {
            "method": "grpo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_distributed.sevens"}],
            "rollout": {"backend": "hf", "num_generations": 4, "max_new_tokens": 6, "temperature": 1.0},
            "args": {"learning_rate": 1.0e-3, "max_steps": 3, "per_device_train_batch_size": 8 // n, "beta": 0.0}}}

    prompts = [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(16)]
    one, two = two_ways(tmp_path, tiny_model_path, grpo, data={"prompts": prompts})
    assert_one_writer(two, "grpo", 3)
    scored = [Counter(tuple(json.loads(line)) for line in (tmp_path / f"n{n}" / "scored.jsonl").read_text().splitlines())
              for n in (1, 2)]
    assert scored[0] == scored[1] and sum(scored[0].values()) == 3 * 8, scored
    rewards1, rewards2 = losses(one, "grpo", "reward/mean"), losses(two, "grpo", "reward/mean")
    assert len(rewards1) == len(rewards2) == 3 and abs(sum(rewards2) - sum(rewards1)) / 3 < 0.1, (rewards1, rewards2)
    assert losses(two, "grpo") == pytest.approx(losses(one, "grpo"), abs=0.05)


# ---------------------------------------------------------------- two machines on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_finish_a_stage_with_one_artifact_and_one_manifest(tmp_path, tiny_model_path):
    sft = {"method": "sft", "data": ["sft"], "args": {"learning_rate": 3.0e-3, "max_steps": 3, "per_device_train_batch_size": 4}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": sft}, launch={"num_processes": 1})
    port = str(free_port())
    machines = []
    for rank in (1, 0):  # the follower first: it waits for machine 0 to write the recipe
        command = [sys.executable, "-m", "alignment.cli", "run", str(recipe), "--run-dir", str(tmp_path / "runs"),
                   "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
                   "--main-process-port", port]
        with open(tmp_path / f"machine{rank}.log", "wb") as log:  # files, not pipes: neither may block on output
            machines.append(subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT))
    try:
        for m in machines:
            m.wait(timeout=600)
    finally:
        for m in machines:
            m.kill()
    outs = [(tmp_path / f"machine{rank}.log").read_text() for rank in (1, 0)]
    assert [m.returncode for m in machines] == [0, 0], outs
    run_dir = tmp_path / "runs" / "t"
    assert "machine 1 of 2" in outs[0] and "ran (machine 1)" in outs[0]
    man = manifest(run_dir, "sft")
    assert man["status"] == "done" and man["info"]["world_size"] == 2
    assert sorted(p.name for p in run_dir.glob("*/manifest.json")) == ["manifest.json"]
    assert [row["step"] for row in metrics(run_dir, "sft") if "loss" in row] == [1, 2, 3]
    assert json.loads((run_dir / "sft" / "model" / "alignkit_model.json").read_text())["kind"] == "full"


# ---------------------------------------------------------------- accelerate config files


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "recipes" / "accelerate").glob("*.yaml")))
def test_shipped_accelerate_configs_load_and_validate(tmp_path, tiny_model_path, config):
    """DDP, FSDP2 (+QLoRA) and DeepSpeed ZeRO-2/3 parse as `accelerate launch --config_file` parses them
    (DeepSpeed need not be installed), as a recipe's launch and as a stage's."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = REPO / "recipes" / "accelerate" / config
    ClusterConfig.from_yaml_file(str(path))
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"], "launch": {"accelerate_config": str(path)}}},
                          launch={"accelerate_config": str(path), "num_processes": 2})
    loaded = load_recipe(recipe)
    assert loaded.stage_launch("sft").accelerate_config == str(path)


def test_validate_names_the_accelerate_config_file_and_line(tmp_path, tiny_model_path):
    from typer.testing import CliRunner

    from alignment.cli import app

    (tmp_path / "accel.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                                         "deepspeed_config:\n  zero_stag: 3\nnum_proceses: 8\n")
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"], "launch": {"accelerate_config": "missing.yaml"}}},
                          launch={"accelerate_config": "accel.yaml"})
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"{recipe}:" in out and "launch.accelerate_config" in out
    assert f"{tmp_path / 'accel.yaml'}:4: unknown deepspeed_config key 'zero_stag' (did you mean 'zero_stage'?)" in out
    assert f"{tmp_path / 'accel.yaml'}:5: unknown accelerate config key 'num_proceses'" in out
    assert "stages.sft.launch.accelerate_config" in out and f"{tmp_path / 'missing.yaml'} does not exist" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fsdp_on_cpu_is_refused_not_run_as_ddp(tmp_path, tiny_model_path):
    """On CPU accelerate wraps an FSDP run in plain DDP (its gloo path has no FSDP): `run` refuses it before
    anything starts (exit 2, the recipe's line and key); `validate` accepts the recipe, as for GPUs, with a note."""
    from typer.testing import CliRunner

    from alignment.cli import app

    fsdp2 = REPO / "recipes" / "accelerate" / "fsdp2.yaml"
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_steps": 1}},
              "sft2": {"method": "sft", "from": "sft", "data": ["sft"], "args": {"max_steps": 1, "fsdp": "full_shard"}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, launch={"accelerate_config": str(fsdp2), "num_processes": 2})
    res = CliRunner().invoke(app, ["run", str(recipe), "--run-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    lines = recipe.read_text().splitlines()
    assert f"{recipe}:{lines.index('  accelerate_config: ' + str(fsdp2)) + 1}: launch.accelerate_config: {fsdp2} has distributed_type FSDP" in out
    assert f"{recipe}:{lines.index('      fsdp: full_shard') + 1}: stages.sft2.args.fsdp" in out
    assert "FSDP needs CUDA GPUs" in out and "plain DDP" in out
    assert not (tmp_path / "runs" / "t" / "sft").exists()  # refused before the first stage started
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "launch.accelerate_config" in res.output and "refuses it" in res.output


# ---------------------------------------------------------------- a shared vllm-server


def test_a_shared_vllm_server_gets_weights_from_rank_0_only(tmp_path):
    """`rollout.url` (one server for every rank): rank 0 pushes after each update, the others wait at the
    barrier. Two gloo ranks, the push recorded instead of sent (the HTTP side is tests/stages/test_rollout.py's)."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        import torch, torch.distributed as dist
        from alignment.rollout import VLLMServerEngine

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        engine = VLLMServerEngine.__new__(VLLMServerEngine)  # as if given by url: no server process of ours
        engine.process = None
        pushes = Path({str(tmp_path)!r}) / f"pushes-{{rank}}"
        def push(model):
            time.sleep(0.5)  # a slow push: rank 1 must still be waiting when it ends
            pushes.open("a").write(f"{{time.time()}}\\n")
        engine._push_weights = push
        for _ in range(2):
            engine.sync_weights(torch.nn.Linear(2, 2))
            Path({str(tmp_path)!r}, f"after-{{rank}}").open("a").write(f"{{time.time()}}\\n")
        dist.destroy_process_group()
    """))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (tmp_path / "pushes-1").exists()
    pushed = [float(t) for t in (tmp_path / "pushes-0").read_text().split()]
    waited = [float(t) for t in (tmp_path / "after-1").read_text().split()]
    assert len(pushed) == 2 and all(w >= p for p, w in zip(pushed, waited))  # rank 1 went on only after each push


# ---------------------------------------------------------------- CUDA only (skipped without it)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, "ddp.yaml", "fsdp2.yaml"])
def test_accelerate_launch_on_every_gpu(tmp_path, tiny_model_path, config):
    """`accelerate launch` over this machine's GPUs, without a config file (DDP) and with the shipped ones."""
    import torch

    gpus = torch.cuda.device_count()
    if config == "fsdp2.yaml" and gpus < 2:
        pytest.skip("FSDP2 needs two GPUs")
    launch = {"num_processes": gpus, **({"accelerate_config": str(REPO / "recipes" / "accelerate" / config)} if config else {})}
    sft = {"method": "sft", "data": ["sft"], "args": {"max_steps": 3, "per_device_train_batch_size": 4}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": sft}, launch=launch)
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    assert manifest(run_dir, "sft")["info"]["world_size"] == gpus
    assert [row["step"] for row in metrics(run_dir, "sft") if "loss" in row] == [1, 2, 3]
