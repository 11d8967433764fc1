"""Rows changed on the way to a trainer are told in the stage's own output (issue 16, kind 2)."""
from __future__ import annotations

import pytest

from tests.helpers import manifest, run_cli, write_jsonl, write_recipe

# the tiny tokenizer is one token per character: "x" * 40 + "?" is a 41-token prompt (shared case 06)
ROWS = [{"prompt": "x" * 40 + "?", "completion": " 7"}] * 6 + [{"prompt": "What is 4+8?", "completion": " 12"}] * 2


def sft_recipe(tmp_path, model, max_length):
    write_jsonl(tmp_path / "sft.jsonl", ROWS)
    stage = {"method": "sft", "data": ["sft"],
             "args": {"max_length": max_length, "max_steps": 1, "per_device_train_batch_size": 2}}
    return write_recipe(tmp_path, model, {"sft": stage}, data={"sft": {"path": "sft.jsonl"}})


def test_sft_tells_how_many_answers_max_length_cuts_away(tmp_path, tiny_model_path, capfd):
    res = run_cli(sft_recipe(tmp_path, tiny_model_path, 41), "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    assert f"data: dataset 'sft': 6 row(s) truncated" in res.output  # validate, before the stage starts
    out = capfd.readouterr().out
    assert f"max_length 41: dataset 'sft': 6 row(s) truncated" in out and f"{tmp_path / 'sft.jsonl'}:1" in out
    # the counts reach the manifest and the report
    info = manifest(tmp_path / "runs" / "t", "sft")["info"]
    assert info["data_report"]["sft"]["truncated"]["rows"] == 6
    assert info["data_report"]["sft"]["truncated"]["examples"][0].startswith(f"{tmp_path / 'sft.jsonl'}:1")


def test_sft_refuses_when_every_answer_is_cut_away_before_any_model_loads(tmp_path, tiny_model_path):
    res = run_cli(sft_recipe(tmp_path, tiny_model_path, 10), "--run-dir", tmp_path / "runs")
    assert res.exit_code == 2, res.output
    assert "max_length 10: every row loses its whole completion" in res.output and "8 row(s)" in res.output
    assert "rerun" not in res.output and not (tmp_path / "runs" / "t" / "sft").exists()


def test_a_data_error_inside_the_stage_exits_2_without_advice_to_resume(tmp_path, tiny_model_path):
    """Data that turned bad after validate (or a check only the stage can make) stops the stage with its one
    message, exit 2 and a failed manifest that keeps it; never 'rerun to resume'."""
    from alignment.pipeline import Pipeline, StageFailed
    from alignment.validate import load_recipe

    recipe = load_recipe(sft_recipe(tmp_path, tiny_model_path, 41))
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "", "completion": " 7"}] * 2)
    with pytest.raises(StageFailed) as exc:
        Pipeline(recipe, tmp_path / "runs").run()
    assert exc.value.exit_code == 2 and "resume" not in str(exc.value)
    assert str(exc.value).startswith(f"stage 'sft' stopped: {tmp_path / 'sft.jsonl'}:1: column 'prompt' is empty")
    man = manifest(tmp_path / "runs" / "t", "sft")
    assert man["status"] == "failed" and man["exit_code"] == 2 and "2 malformed row(s) of 2" in man["error"]
