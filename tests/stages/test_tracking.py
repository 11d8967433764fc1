"""`report_to` (alignment/tracking.py): sft -> ppo on the tiny model with `report_to: tensorboard` writes event files
holding the sft loss series, the ppo reward series and the eval results; a resumed stage's events are not doubled."""
from __future__ import annotations

import pytest

from alignment.recipe import Recipe
from alignment.tracking import TRACKERS, Trackers, missing_packages
from tests.helpers import metrics, run_cli, sum_rows, write_jsonl, write_recipe

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the tensorboard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_recipe_and_tracking_name_the_same_trackers():
    from typing import get_args

    from alignment.recipe import Tracker

    assert set(TRACKERS) == set(get_args(Tracker))


def test_report_to_at_the_top_or_per_stage():
    recipe = Recipe.model_validate({"name": "x", "model": {"name_or_path": "m"}, "report_to": "tensorboard",
                                    "stages": {"a": {"method": "sft"}, "b": {"method": "ppo", "report_to": []},
                                               "c": {"method": "grpo", "report_to": "wandb"}}})
    assert [recipe.stage_report_to(s) for s in "abc"] == [["tensorboard"], [], ["wandb"]]


def test_a_tracker_whose_package_is_missing_is_a_recipe_error(tmp_path, tiny_model_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert missing_packages(["mlflow", "mlflow"]) == ["mlflow is not installed: pip install mlflow"]
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}}, report_to=["mlflow"])
    from typer.testing import CliRunner

    from alignment.cli import app

    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2 and "recipe.yaml:" in res.output and "report_to: mlflow is not installed" in res.output


def test_tensorboard_purges_what_a_resumed_run_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    first = Trackers(["tensorboard"], tmp_path, project="p", run="s", first_step=1)
    for step in (1, 2, 3, 4):
        first.log({"loss": float(step), "flag": True}, step)
    first.finish()
    resumed = Trackers(["tensorboard"], tmp_path, project="p", run="s", first_step=3)  # from checkpoint-2
    for step in (3, 4):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.finish()
    assert scalars(tmp_path / "tracking" / "tensorboard" / "s", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_every_stage_and_the_evals_log_to_tensorboard(tmp_path, tiny_model_path):
    pytest.importorskip("tensorboard")
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(32))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(8)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}])
    stages = {
        "sft": {"method": "sft", "data": ["sft"], "args": {"learning_rate": 3e-3, "max_steps": 3,
                                                           "per_device_train_batch_size": 8, "save_steps": 100}},
        "ppo": {"method": "ppo", "from": "sft", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
                "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 4},
                "args": {"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100}},
    }
    recipe = write_recipe(tmp_path, tiny_model_path, stages, report_to="tensorboard",
                          data={"sft": {"path": "sft.jsonl"}, "prompts": {"path": "prompts.jsonl"},
                                "test": {"path": "test.jsonl"}},
                          evals=[{"task": "accuracy", "data": "test", "args": {"backend": "hf", "max_new_tokens": 4}}])
    res = run_cli(recipe, "--run-dir", tmp_path / "runs", env=ONE_THREAD)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    board = run_dir / "tracking" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["evals", "ppo", "sft"]

    loss = scalars(board / "sft", "loss")  # the same series as metrics.jsonl, step for step
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in metrics(run_dir, "sft") if "loss" in r]
    assert [s for s, _ in loss] == [1, 2, 3]
    reward = scalars(board / "ppo", "reward/mean")
    assert reward == [(r["step"], pytest.approx(r["reward/mean"])) for r in metrics(run_dir, "ppo")]
    assert [s for s, _ in reward] == [1, 2] and scalars(board / "ppo", "kl/ref")

    accuracy = scalars(board / "evals", "eval/accuracy/accuracy")  # base, sft, ppo at steps 0, 1, 2
    assert [s for s, _ in accuracy] == [0, 1, 2]
    for step, stage in enumerate(["base", "sft", "ppo"]):
        import json

        expected = json.loads((run_dir / "evals" / f"{stage}.json").read_text())["tasks"]["accuracy"]["metrics"]["accuracy"]
        assert accuracy[step][1] == pytest.approx(expected)
