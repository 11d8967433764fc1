"""Decontamination (alignment/decontam.py): validate and plan report the n-gram overlap of every training set with
every eval set, by row; `decontaminate: {action: drop | warn}` leaves the rows out or keeps them, counted in the
stage's data report (and so in the run report); dropping is part of the stage's fingerprint."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from alignment.decontam import EvalIndex, overlap_report, row_grams
from alignment.validate import load_recipe
from tests.helpers import write_jsonl, write_recipe

QUESTION = ("A farmer has seventeen sheep and all but nine run away through the broken gate of the old "
            "north field; how many are left")  # 22 words: a benchmark-style question


def setup(tmp_path, tiny_model_path, **top):
    """sft rows: 10 clean sums; row 4 holds the eval question inside a longer text, row 8 a 13-word window of it."""
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(10)]
    rows[3]["prompt"] = "Here is a riddle. " + QUESTION + "? Think first."
    rows[7]["completion"] = " ".join(QUESTION.split()[5:18])  # exactly 13 words, in order
    write_jsonl(tmp_path / "sft.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": QUESTION + "?", "answer": "9"}, {"prompt": "What is 2+2?", "answer": "4"}])
    return write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"], "args": {"max_steps": 1}}},
                        data={"sft": {"path": "sft.jsonl"}, "test": {"path": "test.jsonl"}},
                        evals=[{"task": "accuracy", "data": "test"}], **top)


def test_row_grams():
    assert row_grams({"prompt": [{"role": "user", "content": "What IS 2+2?"}], "answer": "4"}, 13) == {("what", "is", "2", "2")}
    grams = row_grams({"text": "a b c d e"}, 3)
    assert grams == {("a", "b", "c"), ("b", "c", "d"), ("c", "d", "e")}


def test_a_system_prompt_shared_by_training_and_eval_rows_is_not_an_overlap(tmp_path, tiny_model_path):
    system = {"role": "system", "content": "Answer with the number only."}
    assert row_grams({"prompt": [system, {"role": "developer", "content": "Be brief."},
                                 {"role": "user", "content": "What is 2+2?"}]}, 13) == {("what", "is", "2", "2")}
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": [system, {"role": "user", "content": f"What is {i}+{i}?"}],
                                          "completion": [{"role": "assistant", "content": str(2 * i)}]} for i in range(4)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": [{"role": "user", "content": "What is 7+8?"}], "answer": "15"},
                                          {"prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": "2"}])
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"], "args": {"max_steps": 1}}},
                          data={"sft": {"path": "sft.jsonl"}, "test": {"path": "test.jsonl", "system_prompt": system["content"]}},
                          evals=[{"task": "accuracy", "data": "test"}])
    n, pairs = overlap_report(load_recipe(recipe))
    assert [(p.train, p.eval, p.rows) for p in pairs if p.rows] == [("sft", "test", 1)]  # 1+1, not the system prompt


def test_validate_and_plan_report_the_overlap_by_row(tmp_path, tiny_model_path):
    recipe = setup(tmp_path, tiny_model_path)
    n, pairs = overlap_report(load_recipe(recipe))
    [pair] = pairs
    assert (n, pair.train, pair.eval, pair.rows, pair.total) == (13, "sft", "test", 2, 10)
    assert pair.examples[0].startswith(f"{tmp_path / 'sft.jsonl'}:4 ~ {tmp_path / 'test.jsonl'}:1: '")
    assert pair.examples[1].startswith(f"{tmp_path / 'sft.jsonl'}:8 ~ {tmp_path / 'test.jsonl'}:1: '")
    for command in ("validate", "plan"):
        res = CliRunner().invoke(app, [command, str(recipe), *(["--run-dir", str(tmp_path / "runs")] if command == "plan" else [])])
        assert res.exit_code == 0, res.output
        out = " ".join(res.output.split())
        assert "13-gram overlap: training set 'sft' x eval set 'test': 2 of 10 row(s); e.g." in out
        assert "set `decontaminate: {action: drop}` to leave them out" in out

    n, pairs = overlap_report(load_recipe(setup(tmp_path, tiny_model_path, decontaminate={"ngram": 14})))
    assert pairs[0].rows == 1  # the 13-word window is no 14-gram; the whole question still is


@pytest.mark.parametrize("action,kept", [("drop", 8), ("warn", 10)])
def test_the_stage_drops_or_warns_and_counts(tmp_path, tiny_model_path, action, kept, capsys):
    from alignment.stages import StageContext

    recipe = load_recipe(setup(tmp_path, tiny_model_path, decontaminate={"action": action}))
    ctx = StageContext(recipe=recipe, name="sft", run_dir=tmp_path / "runs" / "t")
    dataset = ctx.dataset()
    assert len(dataset) == kept
    kind = {"drop": "contaminated", "warn": "overlapping"}[action]
    counts = ctx.data_report.to_dict()["sft"][kind]
    assert counts["rows"] == 2 and counts["examples"][0].startswith(f"{tmp_path / 'sft.jsonl'}:4: 13-gram '")
    assert f"dataset 'sft': 2 row(s) {kind}" in capsys.readouterr().out


def test_dropping_is_part_of_the_fingerprint(tmp_path, tiny_model_path):
    from alignment.pipeline import stage_inputs

    plain = stage_inputs(load_recipe(setup(tmp_path, tiny_model_path)), "sft", {})
    warn = stage_inputs(load_recipe(setup(tmp_path, tiny_model_path, decontaminate={"action": "warn"})), "sft", {})
    drop = stage_inputs(load_recipe(setup(tmp_path, tiny_model_path, decontaminate={"action": "drop"})), "sft", {})
    assert plain == warn and "decontaminate" not in plain  # reporting and warning change no training row
    assert drop["decontaminate"]["ngram"] == 13 and list(drop["decontaminate"]["evals"]) == ["test"]


def test_the_report_shows_the_counts():
    from evals.report import RunData, _decontamination

    data = RunData(run_dir=None, name="t", recipe_text="", base_model="m", stages=["sft"], methods={"sft": "sft"},
                   manifests={"sft": {"info": {"data_report": {"sft": {"contaminated": {
                       "rows": 2, "examples": ["sft.jsonl:4: 13-gram 'x' also in eval set 'test' (test.jsonl:1)"]}}}}}})
    assert _decontamination(data) == ["sft: training set 'sft': 2 row(s) contaminated -- shares an n-gram with an eval "
                                      "set, left out (decontaminate: drop); e.g. sft.jsonl:4: 13-gram 'x' also in eval "
                                      "set 'test' (test.jsonl:1)"]


def test_an_index_without_evals_is_empty(tmp_path, tiny_model_path):
    recipe = load_recipe(setup(tmp_path, tiny_model_path)).model_copy(update={"evals": []})
    assert EvalIndex.build(recipe, 13).grams == {} and overlap_report(recipe)[1] == []
