"""Rows changed on the way to a trainer are told in the stage's own output (issue 16, kind 2)."""
from __future__ import annotations

from tests.helpers import run_cli, write_jsonl, write_recipe

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
    out = capfd.readouterr().out
    assert f"max_length 41: dataset 'sft': 6 row(s) truncated" in out and f"{tmp_path / 'sft.jsonl'}:1" in out


def test_sft_refuses_when_every_answer_is_cut_away(tmp_path, tiny_model_path, capfd):
    res = run_cli(sft_recipe(tmp_path, tiny_model_path, 10), "--run-dir", tmp_path / "runs")
    assert res.exit_code != 0
    err = capfd.readouterr().err
    assert "max_length 10: every row loses its whole completion" in err and "8 row(s)" in err
