"""The spine end to end on the tiny model: stages in child processes, skip, stale, resume, lock."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignment.pipeline import Pipeline, RunLocked, run_lock
from alignment.validate import load_recipe
from tests.helpers import losses, manifest, metrics, run_cli, write_recipe

SFT = {"method": "sft", "data": ["sft"],
       "args": {"learning_rate": 3.0e-3, "max_steps": 12, "per_device_train_batch_size": 8, "save_steps": 4}}



def test_sft_trains_skips_when_done_and_reruns_when_stale(tmp_path, tiny_model_path):
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": SFT})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    m = manifest(run_dir, "sft")
    assert m["status"] == "done" and (run_dir / "sft" / "model" / "model.safetensors").exists()
    assert m["inputs"]["args"]["max_length"] == 1024  # sft's registered default, hashed
    config = m["trainer_config"]  # what the trainer was built with
    assert config["max_length"] == 1024 and config["save_steps"] == 4 and config["learning_rate"] == 3.0e-3
    loss = losses(run_dir, "sft")
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < 0.7 * sum(loss[:3]) / 3  # loss falls

    res = run_cli(recipe, "--run-dir", tmp_path / "runs")  # same fingerprint: skipped
    assert res.exit_code == 0 and "done, skipped" in res.output
    assert manifest(run_dir, "sft")["started_at"] == m["started_at"]

    recipe.write_text(recipe.read_text().replace("max_steps: 12", "max_steps: 4"))
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0 and "rerunning from scratch (changed: args.max_steps)" in res.output
    assert len(losses(run_dir, "sft")) == 4


# `alignkit run` in a process where importing torch, transformers or TRL fails: only its children may import them.
NO_TORCH_RUN = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "trl"):
            raise ImportError(f"the orchestrator imported {name}")

sys.meta_path.insert(0, NoTorch())
from alignment.cli import main
main()
"""


def test_the_orchestrator_never_imports_torch(tmp_path, tiny_model_path):
    """The checks and the plan run in a child: the process that waits on the stages stays light, and runs, skips
    and refuses as before. The planning child then runs the first stage itself (its imports paid once): the same
    losses as the second, identical stage started fresh."""
    stage = {**SFT, "args": {**SFT["args"], "max_steps": 3}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"warm": stage, "fresh": stage})
    orchestrate = [sys.executable, "-c", NO_TORCH_RUN, "run", str(recipe), "--run-dir", str(tmp_path / "runs")]
    res = subprocess.run(orchestrate, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = tmp_path / "runs" / "t"
    assert [manifest(run_dir, s)["warm_start"] for s in ("warm", "fresh")] == [True, False]
    assert len(losses(run_dir, "warm")) == 3 and losses(run_dir, "warm") == pytest.approx(losses(run_dir, "fresh"), rel=1e-6)
    assert res.stdout.count("warm step 3/3") >= 1  # the warm stage's output is relayed
    res = subprocess.run(orchestrate, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.count("done, skipped") == 2, res.stdout + res.stderr

    recipe.write_text(recipe.read_text().replace("learning_rate:", "learning_rat:"))
    res = subprocess.run(orchestrate, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown SFTConfig argument 'learning_rat'" in res.stderr, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "rerun" not in res.stderr


def test_a_planned_pipeline_is_the_computed_one(tmp_path, tiny_model_path):
    rec = load_recipe(write_recipe(tmp_path, tiny_model_path, {"a": SFT, "b": {**SFT, "from": "a"}}))
    pipe = Pipeline(rec, tmp_path / "runs")
    planned = Pipeline.from_plan(json.loads(json.dumps(pipe.plan())))
    assert planned.status() == pipe.status() and planned.run_dir == pipe.run_dir
    assert planned.command("b") == pipe.command("b") and planned.recipe == rec


def test_killed_stage_resumes_from_its_last_checkpoint(tmp_path, tiny_model_path):
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": SFT})
    runs = tmp_path / "runs"
    res = run_cli(recipe, "--run-dir", runs, env={"ALIGNKIT_FAULT_KILL_AFTER_SAVE": "8"})
    assert res.exit_code == 1 and "failed" in res.output
    run_dir = runs / "t"
    assert manifest(run_dir, "sft")["status"] == "failed"
    assert not (run_dir / "sft" / "model").exists()  # nothing that looks finished
    assert (run_dir / "sft" / "checkpoints" / "checkpoint-8").is_dir()

    res = run_cli(recipe, "--run-dir", runs)
    assert res.exit_code == 0, res.output
    assert "resuming sft" in res.output
    m = manifest(run_dir, "sft")
    assert m["status"] == "done" and m["resumed"] is True
    steps = [row["step"] for row in metrics(run_dir, "sft") if "loss" in row]
    assert steps == list(range(1, 13))  # each step logged once across the two runs
    # train_loss: the mean over all 12 steps, not only the 4 run after the resume (transformers' own)
    mean = sum(losses(run_dir, "sft")) / 12
    assert m["metrics"]["train_loss"] == pytest.approx(mean, rel=1e-6)
    assert [row["train_loss"] for row in metrics(run_dir, "sft") if "train_loss" in row][-1] == pytest.approx(mean, rel=1e-6)
    assert f"train_loss {mean:.4g}" in res.output  # the run summary


def test_a_checkpoint_cut_off_while_saving_is_skipped_for_the_previous_one(tmp_path, tiny_model_path, capfd):
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": SFT})
    runs = tmp_path / "runs"
    res = run_cli(recipe, "--run-dir", runs, env={"ALIGNKIT_FAULT_KILL_AFTER_SAVE": "8"})
    assert res.exit_code == 1
    run_dir = runs / "t"
    cut = run_dir / "sft" / "checkpoints" / "checkpoint-8"
    (cut / "trainer_state.json").unlink()  # as if killed (or out of disk) before the save's last file
    (cut / "optimizer.pt").write_bytes(b"\x80\x02truncat")

    capfd.readouterr()
    res = run_cli(recipe, "--run-dir", runs)
    assert res.exit_code == 0, res.output
    child = capfd.readouterr().out  # the stage process writes to the real stdout
    assert "checkpoint-8 of sft is incomplete" in child and "resuming sft from checkpoint-4" in child
    assert not (run_dir / "sft" / "checkpoints" / "checkpoint-8").exists() or \
        (run_dir / "sft" / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists()  # written again, whole
    assert manifest(run_dir, "sft")["status"] == "done"
    steps = [row["step"] for row in metrics(run_dir, "sft") if "loss" in row]
    assert steps == list(range(1, 13))  # steps 5-8 logged again after the resume from 4, once each


def test_second_run_on_same_run_dir_is_refused(tmp_path, tiny_model_path):
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": SFT})
    run_dir = tmp_path / "runs" / "t"
    with run_lock(run_dir):
        res = run_cli(recipe, "--run-dir", tmp_path / "runs")
        assert res.exit_code == 1 and "another alignkit run" in res.output
        with pytest.raises(RunLocked):
            Pipeline(load_recipe(recipe), tmp_path / "runs").run()


def test_chained_stage_starts_from_the_previous_artifact(tmp_path, tiny_model_path):
    sft = {**SFT, "args": {**SFT["args"], "max_steps": 4}}
    stages = {"sft": sft, "sft2": {**sft, "from": "sft"}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, model={"adapter": {"method": "lora", "r": 4}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs", "--stage", "sft2")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    first, second = manifest(run_dir, "sft"), manifest(run_dir, "sft2")
    assert second["inputs"]["from_fingerprint"] == first["fingerprint"]
    meta = json.loads((run_dir / "sft2" / "model" / "alignkit_model.json").read_text())
    assert meta["kind"] == "adapter" and meta["base"] == "../../sft/merged"  # in-run lineage: relative to the file
    peft_base = json.loads((run_dir / "sft2" / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert peft_base == "../../sft/merged"
    assert json.loads((run_dir / "sft" / "model" / "alignkit_model.json").read_text())["base"] == str(tiny_model_path)

    # --force with --stage reruns only that stage
    res = run_cli(recipe, "--run-dir", tmp_path / "runs", "--stage", "sft2", "--force")
    assert "sft (sft): done, skipped" in res.output and "rerunning from scratch (forced)" in res.output


def test_a_moved_run_directory_skips_and_merges_through_its_own_lineage(tmp_path, tiny_model_path):
    """Shared case 08: a run directory renamed after the run still skips its done stages, builds a stage's
    merged weights from the in-run base and evaluates it; nothing in it names the old location."""
    import shutil

    from alignment.rundir import RunDir

    sft = {**SFT, "args": {**SFT["args"], "max_steps": 2}}
    stages = {"sft": sft, "sft2": {**sft, "from": "sft"}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, model={"adapter": {"method": "lora", "r": 4}})
    assert run_cli(recipe, "--run-dir", tmp_path / "runsA").exit_code == 0
    shutil.rmtree(tmp_path / "runsA" / "t" / "sft2" / "merged", ignore_errors=True)
    (tmp_path / "runsA").rename(tmp_path / "runsB")
    moved = tmp_path / "runsB" / "t"
    # (trainer checkpoints are HF Trainer's files: resuming reads no base path from them)
    stored = [p for p in moved.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".jsonl", ".md")
              and "checkpoints" not in p.parts and "report" not in p.parts]  # the report is written anew by each run
    assert stored and not [p for p in stored if "runsA" in p.read_text()]
    res = run_cli(recipe, "--run-dir", tmp_path / "runsB")
    assert res.exit_code == 0 and res.output.count("done, skipped") == 2, res.output
    merged = RunDir(moved).weights(load_recipe(recipe), "sft2")
    assert merged == str(moved / "sft2" / "merged") and (moved / "sft2" / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("model", [
    {"adapter": {"method": "lora", "r": 8, "alpha": 16}},
    {"adapter": {"method": "dora", "r": 8, "alpha": 16}},
    {"adapter": {"method": "rslora", "r": 8, "alpha": 16}, "quantization": {"bits": 4, "type": "nf4"}},
], ids=["lora", "dora", "qlora-rslora"])
def test_adapters_train(tmp_path, tiny_model_path, model):
    # LoRA on a 2-layer random model learns slowly: 20 steps at a high LR, a 10 % fall
    sft = {**SFT, "args": {**SFT["args"], "learning_rate": 1.0e-2, "max_steps": 20, "save_steps": 100}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": sft}, model=model)
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "sft" / "model" / "adapter_model.safetensors").exists()
    loss = losses(run_dir, "sft")
    assert sum(loss[-3:]) / 3 < 0.9 * sum(loss[:3]) / 3


def test_launch_command_plain_or_accelerate(tmp_path, tiny_model_path):
    stages = {"a": SFT, "b": {**SFT, "launch": {"accelerate_config": "acc.yaml", "num_processes": 4,
                                               "extra_args": ["--num_machines", "2"]}}}
    (tmp_path / "acc.yaml").write_text("distributed_type: MULTI_GPU\n")
    pipe = Pipeline(load_recipe(write_recipe(tmp_path, tiny_model_path, stages)), tmp_path / "runs")
    assert pipe.command("a")[1:] == ["-m", "alignment.stage", str(pipe.run_dir), "a"]
    cmd = pipe.command("b")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[3:9] == ["--config_file", str(tmp_path / "acc.yaml"), "--num_processes", "4", "--num_machines", "2"]
    assert cmd[-4:] == ["-m", "alignment.stage", str(pipe.run_dir), "b"]
