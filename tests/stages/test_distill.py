"""The distill stage (TRL's experimental GKDTrainer) on tiny models: a wider teacher with the same tokenizer,
given as a folder or as an earlier stage; the student-teacher divergence falls; bad teachers and data are
refused at validate time with file:line and key."""
from __future__ import annotations

import json

import pytest
import torch

from alignment.recipe import RecipeError
from alignment.testing import make_tiny_llama
from tests.helpers import losses, pair_rows, run_cli, sum_rows, write_jsonl, write_recipe


def test_trl_gkd_api_pinned():
    """The TRL 1.16 experimental API the stage uses; an upgrade that moves or renames it fails here."""
    import dataclasses
    import inspect

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    fields = {f.name: f.default for f in dataclasses.fields(GKDConfig)}
    assert {"lmbda": 0.5, "beta": 0.5, "seq_kd": False, "max_new_tokens": 128}.items() <= fields.items()
    assert callable(GKDTrainer.generalized_jsd_loss)
    # the stage's DistillTrainer multiplies the loss by the process count that GKD's compute_loss leaves out
    assert "num_processes" not in inspect.getsource(GKDTrainer.compute_loss)


def _teacher(path, *, scale: float = 8.0):
    """A wider (hidden 128) tiny Llama, same tokenizer, with a sharpened untied head: a teacher whose
    next-token distribution is far from the student's uniform-ish one."""
    from transformers import AutoModelForCausalLM

    make_tiny_llama(path, seed=1, hidden=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(path)
    return path


def divergence(student_dir, teacher_dir, rows) -> float:
    """Mean generalized JSD (beta 0.5, TRL's own function) over the completion tokens of chat rows."""
    from trl.experimental.gkd import GKDTrainer

    from alignment.models import load_pretrained, load_tokenizer

    tok = load_tokenizer(str(teacher_dir))
    student, teacher = load_pretrained(str(student_dir)), load_pretrained(str(teacher_dir))
    values = []
    with torch.no_grad():
        for row in rows:
            head = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            ids = tok(full, return_tensors="pt", add_special_tokens=False)["input_ids"]
            start = len(tok(head, add_special_tokens=False)["input_ids"])
            labels = ids.clone()
            labels[:, :start] = -100
            values.append(GKDTrainer.generalized_jsd_loss(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1],
                                                          labels=labels[:, 1:], beta=0.5).item())
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("distill")
    _teacher(tmp / "teacher")
    common = {"per_device_train_batch_size": 8, "save_steps": 100, "learning_rate": 1e-2}
    stages = {
        # a teacher folder, wider than the student; half the batches sampled from the student (on-policy)
        "distill": {"method": "distill", "teacher": "teacher", "data": ["sft"],
                    "args": {**common, "max_steps": 12, "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 6}},
    }
    recipe = write_recipe(tmp, tiny_model_path, stages)
    res = run_cli(recipe, "--run-dir", tmp / "runs")
    assert res.exit_code == 0, res.output
    return tmp, tmp / "runs" / "t"


def test_divergence_to_teacher_falls(distilled, tiny_model_path):
    tmp, run = distilled
    rows = sum_rows(16, seed=1)
    before = divergence(tiny_model_path, tmp / "teacher", rows)
    after = divergence(run / "distill" / "model", tmp / "teacher", rows)
    assert after < 0.5 * before, (before, after)
    assert len(losses(run, "distill")) == 12


def test_stage_teacher_is_a_dependency(tmp_path, tiny_model_path):
    """`teacher: sft` runs sft first, reads its artifact through the run directory, and is in the fingerprint."""
    from alignment.pipeline import stage_inputs
    from alignment.stages.distill import teacher_path
    from alignment.validate import load_recipe

    write_jsonl(tmp_path / "sft.jsonl", sum_rows(4))
    stages = {"distill": {"method": "distill", "teacher": "sft", "data": ["sft"]},
              "sft": {"method": "sft", "data": ["sft"]}}
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_path, stages))
    assert recipe.order() == ["sft", "distill"] and recipe.ancestors("distill") == ["sft", "distill"]
    assert teacher_path(recipe, "distill", lambda stage: f"runs/t/{stage}/model") == "runs/t/sft/model"
    assert stage_inputs(recipe, "distill", {"sft": "abc"})["depends_on"] == {"sft": "abc"}


# ---------------------------------------------------------------- validation


def _recipe(tmp, model, **stage):
    write_jsonl(tmp / "pairs.jsonl", pair_rows(4))
    data = {"sft": {"path": "sft.jsonl"}, "pairs": {"path": "pairs.jsonl"}}
    write_jsonl(tmp / "sft.jsonl", sum_rows(4))
    spec = {"method": "distill", "data": ["sft"], **stage}
    return write_recipe(tmp, model, {"distill": spec}, data=data)


def _line(path, text):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _error(path) -> str:
    from alignment.validate import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return str(err.value)


def test_teacher_with_another_tokenizer_refused(tmp_path, tiny_model_path):
    from alignment.models import load_tokenizer

    teacher = make_tiny_llama(tmp_path / "other", hidden=96 + 32)
    tok = load_tokenizer(str(teacher))
    tok.add_tokens(["<extra>"])  # one more token: another vocabulary
    tok.save_pretrained(teacher)
    path = _recipe(tmp_path, tiny_model_path, teacher="other")
    text = _error(path)
    assert f"{path}:{_line(path, 'teacher:')}: stages.distill.teacher: the teacher's tokenizer differs" in text
    assert "'<extra>'=" in text


def test_teacher_with_another_vocab_size_refused(tmp_path, tiny_model_path):
    teacher = make_tiny_llama(tmp_path / "other")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    assert "stages.distill.teacher: the teacher's vocab_size" in _error(_recipe(tmp_path, tiny_model_path, teacher="other"))


@pytest.mark.parametrize("stage, error", [
    ({}, "stages.distill.teacher: distill needs `teacher:`"),
    ({"teacher": "no_such_dir"}, "stages.distill.teacher: cannot read the teacher 'no_such_dir'"),
    ({"teacher": "base", "args": {"lmbda": 1.5}}, "stages.distill.args.lmbda: GKDConfig refuses these args: lmbda must be"),
    ({"teacher": "base", "args": {"lambda": 0.5}}, "unknown GKDConfig argument 'lambda' (did you mean 'lmbda'?)"),
])
def test_bad_distill_stage_refused(tmp_path, tiny_model_path, stage, error):
    assert error in _error(_recipe(tmp_path, tiny_model_path, **stage))


def test_teacher_only_for_distill(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(4))
    path = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"], "teacher": "base"}})
    assert "stages.sft.teacher: only method distill reads `teacher:`" in _error(path)


def test_wrong_data_format_names_file_line_and_columns(tmp_path, tiny_model_path):
    path = _recipe(tmp_path, tiny_model_path, teacher="base", data=["pairs"])
    res = run_cli(path, "--run-dir", tmp_path / "runs")  # `run` checks the data before any stage starts
    assert res.exit_code == 2
    assert f"{tmp_path / 'pairs.jsonl'}:1" in res.output and "messages or prompt/completion" in res.output


def test_alignkit_list_shows_distill_and_judge():
    from typer.testing import CliRunner

    from alignment.cli import app

    out = CliRunner().invoke(app, ["list"]).output
    assert "distill  messages, prompt_completion" in out
    rewards_line = next(line for line in out.splitlines() if line.startswith("rewards:"))
    assert "judge" in rewards_line.split(": ")[1].split(", ")
    assert "judge_score" in out and "judge_win_rate" in out


def test_quickstart_recipe_validates():
    from pathlib import Path

    from alignment.validate import load_recipe

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "quickstart" / "distill.yaml")
    assert recipe.order() == ["sft", "distill"] and recipe.stages["distill"].teacher == "sft"
