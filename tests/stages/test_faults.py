"""The standing fault suite (issues 16 and 17): a stage process killed (SIGKILL) while it prepares its data,
while it saves a checkpoint, mid-training and while it writes its artifact -- the rerun ends done with one
complete artifact; a stale lock is taken over with a message; random mutations of a valid recipe end in a
valid recipe or one error naming file:line, never a traceback.

Kill points are `StageContext.fault_point` (`ALIGNKIT_FAULT_KILL_AT=POINT[@STEP]`) and `fault_hook`
(`ALIGNKIT_FAULT_KILL_AFTER_SAVE=STEP`). SFT runs in the fast suite; the other methods are `slow`.
"""
from __future__ import annotations

import copy
import random

import pytest
import yaml

from alignment.data import DataError
from alignment.recipe import RecipeError
from alignment.rundir import RunDir
from alignment.stages import FAULT_ENV
from alignment.validate import check_inputs, load_recipe
from tests.helpers import manifest, pair_rows, run_cli, sum_rows, write_jsonl, write_recipe

ARGS = {"max_steps": 3, "save_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1.0e-3}
METHODS = {
    "sft": ({"method": "sft", "data": ["sft"], "args": ARGS}, "sft", sum_rows(16)),
    "dpo": ({"method": "dpo", "data": ["pairs"], "args": {**ARGS, "beta": 0.1}}, "pairs", pair_rows(16)),
}
FAULTS = {  # name -> environment of the killed run
    "data": {FAULT_ENV: "data"},
    "save": {FAULT_ENV: "save@2"},  # checkpoint-2 cut off before trainer_state.json
    "mid-train": {"ALIGNKIT_FAULT_KILL_AFTER_SAVE": "2"},
    "artifact": {FAULT_ENV: "artifact"},
}


def cases():
    for method in METHODS:
        for fault in FAULTS:
            marks = [] if method == "sft" and fault != "mid-train" else [pytest.mark.slow]  # mid-train: test_pipeline
            yield pytest.param(method, fault, marks=marks, id=f"{method}-{fault}")


@pytest.mark.parametrize("method, fault", list(cases()))
def test_a_killed_stage_reruns_to_one_complete_artifact(tmp_path, tiny_model_path, method, fault, capfd):
    stage, dataset, rows = METHODS[method]
    write_jsonl(tmp_path / f"{dataset}.jsonl", rows)
    recipe = write_recipe(tmp_path, tiny_model_path, {method: stage}, data={dataset: {"path": f"{dataset}.jsonl"}})
    runs, run_dir = tmp_path / "runs", RunDir(tmp_path / "runs" / "t")
    killed = run_cli(recipe, "--run-dir", runs, env=FAULTS[fault])
    assert killed.exit_code == 1 and "exit code -9" in killed.output, killed.output
    # the advice names what a rerun will do: resume from the checkpoint there is, or start over (none yet)
    saved = run_dir.checkpoints(method)
    assert (f"resumes it from {saved[-1].name}" if saved else "it saved no checkpoint: `alignkit run` again starts "
            "it over") in " ".join(killed.output.split()), killed.output
    assert manifest(run_dir.path, method)["status"] == "failed" and not run_dir.done(method)
    assert not run_dir.model_dir(method).exists()  # a cut-off artifact is never taken as done
    capfd.readouterr()
    rerun = run_cli(recipe, "--run-dir", runs)
    assert rerun.exit_code == 0, rerun.output
    assert run_dir.done(method) and (run_dir.model_dir(method) / "alignkit_model.json").exists()
    assert sorted(p.name for p in run_dir.stage_dir(method).iterdir() if p.name.startswith("model")) == ["model"]
    assert [r["step"] for r in run_dir.read_metrics(method) if "loss" in r] == [1, 2, 3]  # each step once
    child = capfd.readouterr().out  # the stage process's own output
    if fault == "save":
        assert f"checkpoint-2 of {method} is incomplete (cut off while saving); resuming from checkpoint-1" in child
    if fault != "data":
        assert "resuming" in rerun.output


RL_ARGS = {"max_steps": 3, "save_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3}
RL = {  # the generating methods: hf rollouts, 2 completions of 4 tokens per prompt
    "grpo": {"method": "grpo", "args": {**RL_ARGS, "beta": 0.0}},
    "ppo": {"method": "ppo", "args": RL_ARGS},
}
RL_FAULTS = [  # (environment of a killed run, what that run says), in order, on one run directory
    ({FAULT_ENV: "data"}, None),
    ({FAULT_ENV: "save@2"}, None),  # checkpoint-2 cut off while saving
    ({"ALIGNKIT_FAULT_KILL_AFTER_SAVE": "2"},  # mid-training, right after checkpoint-2
     "checkpoint-2 of {m} is incomplete (cut off while saving); resuming from checkpoint-1"),
    ({FAULT_ENV: "artifact"}, "resuming {m} from checkpoint-2"),
]


@pytest.mark.slow  # 5 runs each: 1.5-2 min of CPU (5-8 min wall with this 2-core machine 4x oversubscribed)
@pytest.mark.parametrize("method", list(RL))
def test_a_generating_stage_killed_at_each_point_in_turn_ends_done(tmp_path, tiny_model_path, method, capfd):
    """GRPO and PPO: one run directory, the stage child killed (SIGKILL) at each point in turn -- data ready,
    checkpoint-2 cut off while saving, right after checkpoint-2 is written again, the artifact half-written -- each
    rerun going on from what the last one left; no killed run leaves a stage that looks done or an artifact, and
    each step is logged once."""
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(8)]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    stage = {**RL[method], "data": ["prompts"], "rewards": [{"name": "tests.stages.test_grpo.sevens"}],
             "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 4}}
    recipe = write_recipe(tmp_path, tiny_model_path, {method: stage}, data={"prompts": {"path": "prompts.jsonl"}})
    runs, run_dir = tmp_path / "runs", RunDir(tmp_path / "runs" / "t")
    for env, says in RL_FAULTS:
        killed = run_cli(recipe, "--run-dir", runs, env=env)
        assert killed.exit_code == 1 and "exit code -9" in killed.output, (env, killed.output)
        assert manifest(run_dir.path, method)["status"] == "failed" and not run_dir.done(method)
        assert not run_dir.model_dir(method).exists()  # a cut-off artifact is never taken as done
        if says:
            assert says.format(m=method) in capfd.readouterr().out, env  # the stage process's own output
        capfd.readouterr()
    rerun = run_cli(recipe, "--run-dir", runs)
    assert rerun.exit_code == 0, rerun.output
    assert "resuming" in rerun.output
    assert run_dir.done(method) and (run_dir.model_dir(method) / "alignkit_model.json").exists()
    assert sorted(p.name for p in run_dir.stage_dir(method).iterdir() if p.name.startswith("model")) == ["model"]
    assert [r["step"] for r in run_dir.read_metrics(method) if "reward/mean" in r] == [1, 2, 3]  # each step once


def test_a_stale_lock_of_a_dead_run_is_taken_over_saying_so(tmp_path, capfd):
    import subprocess
    import sys

    from alignment.pipeline import run_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    RunDir(run_dir).lock_file.write_text(str(dead.pid))  # its orchestrator was killed: pid written, flock gone
    with run_lock(run_dir):
        pass
    err = capfd.readouterr().err
    assert f"the previous run on {run_dir} (pid {dead.pid}) ended without releasing its lock" in err
    assert "taking the lock over" in err


# ---------------------------------------------------------------- recipe fuzz

BAD_VALUES = [None, "x", 3, -1, 0.5, "1e-3", [], {}, [1, "a"], {"k": 1}, True, "nope_stage", "base"]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _mutate(raw: dict, rng: random.Random) -> dict:
    """One random mutation: a key deleted, a value of the wrong type, a key misspelt, or an unknown name."""
    raw = copy.deepcopy(raw)
    path = rng.choice([p for p in _paths(raw) if p])
    parent = raw
    for part in path[:-1]:
        parent = parent[part]
    key, kind = path[-1], rng.choice(["delete", "value", "misspell", "name"])
    if kind == "delete":
        del parent[key]
    elif kind == "misspell" and isinstance(key, str):
        i = rng.randrange(len(key))
        parent[key[:i] + key[i + 1:] + key[i]] = parent.pop(key)
    elif kind == "name":
        parent[key] = rng.choice(["sftt", "grpo_x", "base", "nothing", "rewards.nope", "tests.none"])
    else:
        parent[key] = rng.choice(BAD_VALUES)
    return raw


def test_random_mutations_of_a_valid_recipe_end_valid_or_in_one_error_with_file_and_line(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(4))
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_steps": 2, "learning_rate": 1.0e-3}},
              "dpo": {"method": "dpo", "from": "sft", "data": ["pairs"], "args": {"beta": 0.1}},
              "grpo": {"method": "grpo", "from": "sft", "data": ["prompts"], "rewards": [{"name": "math_accuracy"}],
                       "rollout": {"num_generations": 2, "max_new_tokens": 8},
                       "args": {"per_device_train_batch_size": 2, "max_steps": 1}}}
    good = write_recipe(tmp_path, tiny_model_path, stages, evals=[{"task": "accuracy", "data": "prompts"}],
                        data={n: {"path": f"{n}.jsonl"} for n in ("sft", "pairs", "prompts")})
    raw = yaml.safe_load(good.read_text())
    check_inputs(load_recipe(good), good)  # the starting point is valid
    rng, outcomes = random.Random(0), {"valid": 0, "refused": 0}
    for i in range(40):
        path = tmp_path / f"mutant{i}.yaml"
        path.write_text(yaml.safe_dump(_mutate(raw, rng), sort_keys=False))
        try:
            check_inputs(load_recipe(path), path)
            outcomes["valid"] += 1
        except RecipeError as err:
            assert all(p.line for p in err.problems), (path.read_text(), str(err))
            outcomes["refused"] += 1
        except DataError as err:
            assert str(tmp_path) in str(err), str(err)  # names the data file
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 20, outcomes


# ---------------------------------------------------------------- a full disk (issue 17, point 3)

DISK_SCRIPT = """
set -u
mount -t tmpfs -o size={size} tmpfs "$RUNS" || exit 77
"$PY" -m alignment.cli run "$RECIPE" --run-dir "$RUNS" > "$LOG1" 2>&1; echo "rc1=$?"
cat "$RUNS/t/sft/manifest.json" 2>/dev/null | tr -d '\\n'; echo
ls "$RUNS/t/sft" | tr "\\n" " "; echo
mount -o remount,size=256m "$RUNS"
"$PY" -m alignment.cli run "$RECIPE" --run-dir "$RUNS" > "$LOG2" 2>&1; echo "rc2=$?"
cat "$RUNS/t/sft/manifest.json" | tr -d '\\n'; echo
ls "$RUNS/t/sft" | tr "\\n" " "; echo
"""


def test_a_full_disk_fails_in_one_line_and_the_rerun_after_freeing_space_finishes(tmp_path, tiny_model_path):
    """The run directory on a 1.5 MiB tmpfs (a private mount namespace): a full fine-tune's second checkpoint does
    not fit. The run exits 1 with one line from the orchestrator, no manifest says running, nothing half-written
    looks finished; with space freed (the tmpfs grown) the rerun resumes and ends done."""
    import json
    import subprocess
    import sys

    stage = {"method": "sft", "data": ["sft"], "args": {**ARGS, "save_total_limit": 3}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": stage})
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {"RUNS": str(runs), "RECIPE": str(recipe), "PY": sys.executable, "LOG1": str(tmp_path / "first.log"),
           "LOG2": str(tmp_path / "second.log")}
    out = subprocess.run(["unshare", "-rm", "sh", "-c", DISK_SCRIPT.format(size="1500k")], capture_output=True,
                         text=True, env={**__import__("os").environ, **env})
    if out.returncode == 77 or "rc1=" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[:200]}")
    lines = out.stdout.splitlines()
    first_log = (tmp_path / "first.log").read_text()
    assert lines[0] == "rc1=1", first_log
    assert "no space left on the device" in first_log.lower() or "failed (exit code 1)" in first_log
    assert json.loads(lines[1])["status"] == "failed"  # never left running
    assert "model" not in lines[2].split()  # no artifact that looks finished
    assert lines[3] == "rc2=0", (tmp_path / "second.log").read_text()
    assert json.loads(lines[4])["status"] == "done" and "model" in lines[5].split() and "model.tmp" not in lines[5]
    assert "resuming sft from checkpoint-1" in (tmp_path / "second.log").read_text()
