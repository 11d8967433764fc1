"""`validate` (and `run` before any stage) refuses, reading files only, what a stage would die on later:
conversational data on a tokenizer without a chat template, a model that is not there, a folder without
tokenizer files, datasets without rows, eval data without its columns, SFT rows max_length cuts."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from alignment.data import DataError
from alignment.recipe import RecipeError
from alignment.validate import check_inputs, load_recipe
from tests.helpers import sum_rows, write_jsonl, write_recipe

SFT = {"sft": {"method": "sft", "data": ["sft"]}}


@pytest.fixture
def no_template_model(tiny_model_path, tmp_path):
    """The tiny model with its chat template removed (a base checkpoint's tokenizer)."""
    folder = shutil.copytree(tiny_model_path, tmp_path / "base-model")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def inputs_error(recipe_path, kind=RecipeError) -> str:
    with pytest.raises(kind) as exc:
        check_inputs(load_recipe(recipe_path), recipe_path)
    return str(exc.value)


@pytest.mark.parametrize("rows", [
    [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}],
    sum_rows(2),  # chat-style prompt / completion
])
def test_conversational_data_on_a_tokenizer_without_chat_template_is_refused_with_the_line(tmp_path, no_template_model, rows):
    write_jsonl(tmp_path / "sft.jsonl", rows)
    recipe = write_recipe(tmp_path, no_template_model, SFT, data={"sft": {"path": "sft.jsonl"}})
    msg = inputs_error(recipe)
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.strip().startswith("- sft"))
    assert f"{recipe}:{line}: stages.sft.data.0: dataset 'sft' is conversational" in msg
    assert "has no chat template" in msg and "tokenizer_config.json" in msg


def test_text_data_on_a_tokenizer_without_chat_template_is_fine(tmp_path, no_template_model):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    recipe = write_recipe(tmp_path, no_template_model, SFT, data={"sft": {"path": "sft.jsonl"}})
    assert check_inputs(load_recipe(recipe), recipe).lines() == []


def test_the_cli_refuses_before_any_model_loads(tmp_path, no_template_model):
    from typer.testing import CliRunner

    from alignment.cli import app

    write_jsonl(tmp_path / "sft.jsonl", sum_rows(2))
    recipe = write_recipe(tmp_path, no_template_model, SFT, data={"sft": {"path": "sft.jsonl"}})
    for command in (["validate", str(recipe)], ["run", str(recipe), "--run-dir", str(tmp_path / "runs")]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 2 and "has no chat template" in res.output, res.output
        assert "Traceback" not in res.output and "rerun" not in res.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, says", [
    ("/no/such/model/folder", "'/no/such/model/folder' is not a local model folder"),
    ("./missing-model", "is not a local model folder"),
    ("someone/no-such-model", "is not a local folder, and the hub is not reachable (HF_HUB_OFFLINE is set)"),
])
def test_a_model_that_is_not_there_is_refused_fast(tmp_path, monkeypatch, name, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}])
    recipe = write_recipe(tmp_path, name, SFT, data={"sft": {"path": "sft.jsonl"}})
    start = time.monotonic()
    msg = inputs_error(recipe)
    assert says in msg and f"{recipe}:4: model.name_or_path" in msg
    assert time.monotonic() - start < 5


def test_a_model_folder_without_tokenizer_files_names_them(tmp_path, tiny_model_path):
    folder = shutil.copytree(tiny_model_path, tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}])
    recipe = write_recipe(tmp_path, folder, SFT, data={"sft": {"path": "sft.jsonl"}})
    msg = inputs_error(recipe)
    assert f"{folder} has no tokenizer files (none of tokenizer.json, tokenizer.model" in msg


@pytest.mark.parametrize("file, text", [
    ("sft.jsonl", ""), ("sft.jsonl", "\n\n"), ("sft.json", "[]"), ("sft.json", ""), ("sft.csv", ""),
    ("sft.csv", "prompt,completion\n"),
])
def test_a_dataset_without_rows_says_so_with_its_file(tmp_path, tiny_model_path, file, text):
    (tmp_path / file).write_text(text)
    recipe = write_recipe(tmp_path, tiny_model_path, SFT, data={"sft": {"path": file}})
    msg = inputs_error(recipe, DataError)
    assert f"dataset 'sft' ({tmp_path / file}) has no rows" in msg


def test_eval_data_without_the_columns_its_task_reads_is_refused_at_validate(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1="}])
    recipe = write_recipe(tmp_path, tiny_model_path, SFT, evals=[{"task": "accuracy", "data": "test"}],
                          data={"sft": {"path": "sft.jsonl"}, "test": {"path": "test.jsonl"}})
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(2))
    msg = inputs_error(recipe)
    assert "evals.0.data: eval task 'accuracy' reads column 'answer' (its `answer_column`)" in msg
    assert f"test.jsonl:1" in msg
    write_jsonl(tmp_path / "test.jsonl", [{"text": "1+1=2"}])
    assert "eval task 'accuracy' needs prompt or messages or chosen/rejected rows" in inputs_error(recipe)


def test_sft_rows_max_length_cuts_are_counted_at_validate(tmp_path, tiny_model_path):
    long = {"prompt": "x" * 40, "completion": "y" * 40}
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}, long])
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_length": 50}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}})
    lines = check_inputs(load_recipe(recipe), recipe).lines()
    assert lines == [f"dataset 'sft': 1 row(s) truncated_partly -- cut by max_length (part of the completion or text "
                     f"lost); e.g. {tmp_path / 'sft.jsonl'}:2: 81 tokens > max_length 50"]  # 80 characters + EOS
    stages["sft"]["args"]["max_length"] = 3  # every completion cut away: nothing would train
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}})
    msg = inputs_error(recipe)  # the recipe's key and line, then the rows
    assert f"{recipe}:" in msg and "stages.sft.args.max_length: max_length 3: every row loses its whole completion" in msg


def test_a_misspelt_top_level_key_is_one_problem_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel: {name_or_path: m}\nstagse:\n  sft: {method: sft}\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert str(exc.value) == f"invalid recipe {recipe}:\n  {recipe}:3: stagse: unknown key 'stagse' (did you mean 'stages'?)"


def test_the_stage_after_validate_in_one_process_reuses_its_tokenizer_and_counted_spans(tmp_path, tiny_model_path,
                                                                                        monkeypatch):
    import alignment.data as data
    from alignment.models import load_tokenizer
    from alignment.recipe import DataRef

    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "x" * 40, "completion": "y" * 40}])
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_length": 50}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}})
    tokenized, spans = [], data.completion_spans
    monkeypatch.setattr(data, "completion_spans", lambda rows, tok: tokenized.append(len(rows)) or spans(rows, tok))
    rec = load_recipe(recipe)
    check_inputs(rec, recipe)
    assert tokenized == [2]
    tokenizer = load_tokenizer(str(tiny_model_path))  # as the stage loads it: validate's, handed over once
    assert load_tokenizer(str(tiny_model_path)) is not tokenizer
    report = data.DataReport()
    ds = data.build(rec.data, [DataRef(name="sft")], ("prompt_completion",))
    assert len(data.check_truncation(ds, tokenizer, 50, rec.data, [DataRef(name="sft")], ("prompt_completion",),
                                     report=report)) == 2
    assert tokenized == [2] and report.counts == {"sft": {"truncated_partly": 1}}  # the same count, not tokenized again
    data.count_truncated(tokenizer, 50, rec.data, [DataRef(name="sft")], ("prompt_completion",))
    assert tokenized == [2, 2]  # the stage is done with it: not kept while it trains


@pytest.mark.parametrize("method, data, kind", [
    ("dpo", {"prompt": "x" * 40, "chosen": "y" * 40, "rejected": "z" * 40}, "truncated_partly"),
    ("kto", {"prompt": "x" * 40, "completion": "y" * 40, "label": True}, "truncated_partly"),
    ("reward", {"prompt": "x" * 40, "chosen": "y" * 40, "rejected": "z" * 40}, "too_long"),
])
def test_rows_every_methods_max_length_cuts_or_drops_are_counted_at_validate(tmp_path, tiny_model_path, method, data, kind):
    """TRL's DPO and KTO cut rows longer than `max_length` (DPO drops those whose prompt fills it), its
    RewardTrainer leaves them out: validate counts them per dataset with file:line, as for SFT; when no row would
    keep its completion, it refuses the recipe."""
    short = {**data, **{k: v[:2] if isinstance(v, str) else v for k, v in data.items()}}
    write_jsonl(tmp_path / "d.jsonl", [short, data])
    stages = {"s": {"method": method, "data": ["d"], "args": {"max_length": 50}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"d": {"path": "d.jsonl"}})
    lines = check_inputs(load_recipe(recipe), recipe).lines()
    assert len(lines) == 1 and lines[0].startswith(f"dataset 'd': 1 row(s) {kind} -- ")
    assert f"e.g. {tmp_path / 'd.jsonl'}:2: 81 tokens > max_length 50" in lines[0]
    stages["s"]["args"]["max_length"] = 2  # every prompt ("xx" at least) fills it
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"d": {"path": "d.jsonl"}})
    assert "stages.s.args.max_length: max_length 2: every row loses its whole completion" in inputs_error(recipe)


def test_max_length_zero_is_not_taken_for_no_limit(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_length": 0}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"sft": {"path": "sft.jsonl"}})
    assert "stages.sft.args.max_length: max_length 0: every row loses its whole completion" in inputs_error(recipe)
