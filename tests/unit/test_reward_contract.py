"""The reward contract of rewards/__init__.py as users meet it (issue 16, kinds 4 and 5): a bad score
is None, counted and named; a TRL-style column parameter receives its column; a user module
beside the recipe imports from any working directory, and one that fails to import is one
error naming its file and line."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import rewards
from alignment.cli import app
from rewards import BoundReward, add_recipe_folder, build_reward, missing_metrics, score
from tests.helpers import write_jsonl, write_recipe


def bound(values_or_error, name="flaky"):
    def fn(prompts, completions, **columns):
        if isinstance(values_or_error, Exception):
            raise values_or_error
        return values_or_error

    return BoundReward(name, fn, {})


# ---------------------------------------------------------------- kind 4: a bad score never reaches a total


@pytest.mark.parametrize("bad, kind", [
    (float("nan"), "returned nan"), (float("inf"), "returned inf"), (-math.inf, "returned -inf"),
    ("1.0", "returned '1.0'"), ([1.0], "returned [1.0]"), (object(), "returned <object"),
])
def test_a_bad_score_is_none_counted_and_named(bad, kind, capsys):
    fn = bound([1.0, bad, 0.5])
    total, per_fn = score([fn], [2.0], ["q"] * 3, ["a", "b", "c"])
    assert per_fn == {"flaky": [1.0, None, 0.5]} and total == [2.0, 0.0, 1.0]  # None counts 0
    assert missing_metrics([fn]) == {"reward/flaky/missing": 1}
    assert missing_metrics([fn]) == {"reward/flaky/missing": 0}  # counts since the last call
    err = capsys.readouterr().err
    assert f"reward 'flaky' {kind}" in err and "completion 1" in err and "reward/flaky/missing" in err


def test_a_reward_that_raises_scores_none_for_its_batch(capsys):
    fn = bound(RuntimeError("judge API timed out"), name="judge")
    other = bound([1.0, 1.0], name="ok")
    total, per_fn = score([fn, other], [1.0, 1.0], ["q", "q"], ["a", "b"])
    assert per_fn == {"judge": [None, None], "ok": [1.0, 1.0]} and total == [1.0, 1.0]
    assert missing_metrics([fn, other]) == {"reward/judge/missing": 2, "reward/ok/missing": 0}
    assert "reward 'judge' raised RuntimeError: judge API timed out" in capsys.readouterr().err


def test_each_kind_of_bad_score_is_reported_once_per_reward(capsys):
    fn = bound([math.nan, math.nan])
    for _ in range(3):
        fn(prompts=["q", "q"], completions=["a", "b"])
    assert capsys.readouterr().err.count("returned nan") == 1 and fn.missing == 6


def test_plain_functions_get_the_same_treatment_in_score():
    def plain(prompts, completions, **columns):
        return [math.nan, 1]

    total, per_fn = score([plain], [1.0], ["q", "q"], ["a", "b"])
    assert per_fn == {"plain": [None, 1.0]} and total == [0.0, 1.0]


def test_none_is_not_applicable_not_missing_and_numbers_become_floats():
    import numpy as np

    fn = bound([None, True, np.float32(0.5), 2])
    assert fn(prompts=["q"] * 4, completions=["a"] * 4) == [None, 1.0, 0.5, 2.0]
    assert fn.missing == 0


@pytest.mark.parametrize("returned, says", [("1.0", "returned str"), (0.5, "returned float"), ([1.0], "returned 1 scores for 2")])
def test_a_return_of_the_wrong_shape_is_an_error_naming_the_reward(returned, says):
    with pytest.raises(ValueError, match=f"reward 'flaky' {says}"):
        bound(returned)(prompts=["q", "q"], completions=["a", "b"])


def test_the_case_10_reward_gives_no_nan_to_the_total():
    def digits_or_nan(prompts, completions, **columns):  # shared case 10's flaky_reward.py
        return [math.nan if i % 3 == 2 else float(any(ch.isdigit() for ch in c)) for i, c in enumerate(completions)]

    fn = BoundReward("flaky_reward.digits_or_nan", digits_or_nan, {})
    total, _ = score([fn], [1.0], ["q"] * 8, ["7", "x", "12", "x", "3", "4", "x", "x"])
    assert all(math.isfinite(t) for t in total) and fn.missing == 2


# ---------------------------------------------------------------- kind 5: TRL-style column parameters


def exact(prompts, completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_a_named_parameter_without_default_receives_the_dataset_column(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "exact", exact)
    fn = build_reward({"name": f"{__name__}.exact"})  # refused before: "add `answer: ...`"
    assert fn.columns == ("answer",)
    assert fn(prompts=["q", "q"], completions=["4", "5"], answer=["4", "4"], trainer_state=None) == [1.0, 0.0]
    with pytest.raises(KeyError, match=r"reads column\(s\) \['answer'\].*columns: gold"):
        fn(prompts=["q"], completions=["4"], gold=["4"], completion_ids=[[1]])


def test_a_keyword_only_parameter_is_still_a_recipe_parameter():
    with pytest.raises(ValueError, match="reward 'length' needs parameter 'max_length'"):
        build_reward({"name": "length", "cache_length": 4})


def test_a_recipe_parameter_clashing_with_a_column_is_refused_with_the_fix():
    fn = build_reward({"name": f"{__name__}.exact", "answer": "4"})
    with pytest.raises(ValueError, match=r"column\(s\) \['answer'\] have the names of parameters set in its recipe "
                                         r"entry; rename the column\(s\) or remove"):
        fn(prompts=["q"], completions=["4"], answer=["4"])


def test_trl_only_calls_by_keyword_so_the_names_must_match():
    def renamed(p, c, **kw):
        return [0.0] * len(c)

    def completions_only(completions, **kw):  # TRL's own examples look like this
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match=r"fn\(prompts, completions, \*\*columns\)"):
        rewards._check_params("renamed", renamed, {})
    fn = BoundReward("c", completions_only, {}, rewards._check_params("c", completions_only, {}))
    assert fn(prompts=["q"], completions=["a"]) == [1.0]


# ---------------------------------------------------------------- kind 5: my_rewards.py beside the recipe

MY_REWARDS = '''
def exact(prompts, completions, answer, **kw):
    return [float(str(c).strip() == str(a)) for c, a in zip(completions, answer)]
'''


@pytest.fixture
def reward_path(monkeypatch):
    """Restore the reward search path and forget user modules after the test."""
    monkeypatch.delenv(rewards.REWARD_PATH_ENV, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in USER_MODULES:
        sys.modules.pop(name, None)


USER_MODULES = ("my_rewards", "broken_rewards", "not_here_rewards")


def grpo_recipe(folder, model, reward_module: str, reward_name="my_rewards.exact"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{reward_name.split('.')[0]}.py").write_text(textwrap.dedent(reward_module))
    write_jsonl(folder / "prompts.jsonl", [{"prompt": "What is 2+2?", "answer": "4"}])
    return write_recipe(folder, model, {"grpo": {"method": "grpo", "data": ["prompts"],
                                                        "rewards": [{"name": reward_name}]}},
                        data={"prompts": {"path": "prompts.jsonl"}})


def validate(recipe, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, ["validate", str(recipe)])
    finally:
        os.chdir(old)


def test_a_reward_module_beside_the_recipe_imports_from_any_directory(tmp_path, reward_path, tiny_model_path):
    recipe = grpo_recipe(tmp_path / "project", tiny_model_path, MY_REWARDS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = validate(recipe, elsewhere)
    assert result.exit_code == 0, result.output
    # the stage process alignkit starts searches the same folder
    child = subprocess.run([sys.executable, "-c", "from rewards import build_reward; "
                            "print(build_reward({'name': 'my_rewards.exact'}).columns)"],
                           cwd=elsewhere, capture_output=True, text=True, env={**os.environ})
    assert child.returncode == 0 and "('answer',)" in child.stdout, child.stderr


def test_a_column_parameter_the_data_lacks_is_refused_at_validate(tmp_path, reward_path, tiny_model_path):
    recipe = grpo_recipe(tmp_path, tiny_model_path, MY_REWARDS.replace("answer", "solution"))
    result = validate(recipe, tmp_path)
    assert result.exit_code == 2
    assert "prompts.jsonl:1: reward 'my_rewards.exact' of stage 'grpo' reads column(s) ['solution']" in result.output


@pytest.mark.parametrize("spec, column", [({"name": "math_accuracy"}, "answer"),
                                          ({"name": "math_accuracy", "column": "gold"}, "gold"),
                                          ({"name": "code_exec"}, "tests")])
def test_a_builtin_rewards_gold_column_the_data_lacks_is_refused_at_validate(tmp_path, tiny_model_path, spec, column):
    """math_accuracy / code_exec read their gold from the column `column:` names; data without it would score
    None for every completion, and the stage stop after `max_missing_reward_steps`, after the model loaded."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2+2?", "solution": "4"}])
    recipe = write_recipe(tmp_path, tiny_model_path, {"grpo": {"method": "grpo", "data": ["prompts"], "rewards": [spec]}},
                          data={"prompts": {"path": "prompts.jsonl"}})
    result = validate(recipe, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"prompts.jsonl:1: reward '{spec['name']}' of stage 'grpo' reads column(s) ['{column}']" in result.output


@pytest.mark.parametrize("module, line, says", [
    ("def exact(prompts, completions, **kw)\n    return [0.0]\n", 1, "syntax error in module 'broken_rewards'"),
    ("import math\nSCALE = 1 / 0\n", 2, "raised ZeroDivisionError: division by zero"),
    ("import no_such_dependency_xyz\n", 1, "No module named 'no_such_dependency_xyz'"),
])
def test_a_reward_module_that_fails_to_import_is_one_error_naming_file_and_line(tmp_path, reward_path, tiny_model_path, module,
                                                                                 line, says):
    recipe = grpo_recipe(tmp_path, tiny_model_path, module, reward_name="broken_rewards.exact")
    result = validate(recipe, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"broken_rewards.py:{line}:" in result.output and says in result.output
    assert "Traceback" not in result.output


def test_a_missing_module_says_where_to_put_it(reward_path):
    with pytest.raises(ImportError, match="cannot import module 'not_here_rewards'.*put not_here_rewards.py beside "
                                          "the recipe"):
        build_reward({"name": "not_here_rewards.exact"})


def test_installed_packages_win_over_the_recipe_folder(tmp_path, reward_path):
    (tmp_path / "json.py").write_text("raise RuntimeError('shadowed')\n")
    add_recipe_folder(tmp_path)
    import importlib

    assert importlib.import_module("json").__name__ == "json"
    assert os.environ[rewards.REWARD_PATH_ENV] == str(tmp_path.resolve())


# ---------------------------------------------------------------- kind 4: a step that trains on nothing


def test_lost_everything_is_true_only_when_every_reward_lost_every_score():
    from rewards import lost_everything

    nan, half, fine = bound([math.nan, math.nan], "nan"), bound([math.nan, 1.0], "half"), bound([1.0, 1.0], "fine")
    assert lost_everything([nan]) is None  # not called since the last check
    score([nan], [1.0], ["a", "b"], ["x", "y"])
    assert lost_everything([nan]) is True
    assert lost_everything([nan]) is None  # the window was reset
    score([nan, half], [1.0, 1.0], ["a", "b"], ["x", "y"])
    assert lost_everything([nan, half]) is False  # one score survived: the step has a signal
    score([nan, fine], [1.0, 1.0], ["a", "b"], ["x", "y"])
    assert lost_everything([nan, fine]) is False
    score([bound(RuntimeError("down"), "api")], [1.0], ["a"], ["x"])


def stage_context(tmp_path, limit=2):
    from alignment.stages import StageContext, load_stages
    from alignment.validate import load_recipe

    load_stages()
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    path = write_recipe(tmp_path, "m", {"grpo": {"method": "grpo", "data": ["p"], "rewards": [{"name": "format"}],
                                                 "max_missing_reward_steps": limit}}, data={"p": {"path": "p.jsonl"}})
    return StageContext(recipe=load_recipe(path), name="grpo", run_dir=tmp_path / "runs")


def test_the_stage_stops_after_max_missing_reward_steps_in_a_row(tmp_path, capsys):
    from alignment.stages import StageInputError

    ctx = stage_context(tmp_path, limit=2)
    nan = bound([math.nan] * 2, "nan_reward")
    ctx.reward_funcs = [nan]
    score([nan], [1.0], ["a", "b"], ["x", "y"])
    ctx.check_rewards(1)
    assert ctx.missing_reward_steps == 1 and "step 1: every reward ('nan_reward') lost every score" in capsys.readouterr().out
    ctx.check_rewards(2)  # no reward call in step 2 (a reused generation): neither counts nor resets
    ctx.reward_funcs = [bound([1.0, 1.0], "ok")]
    score(ctx.reward_funcs, [1.0], ["a", "b"], ["x", "y"])
    ctx.check_rewards(3)
    assert ctx.missing_reward_steps == 0  # a step with a signal resets the count
    ctx.reward_funcs = [nan]
    for step in (4, 5):
        score([nan], [1.0], ["a", "b"], ["x", "y"])
        if step == 5:
            with pytest.raises(StageInputError, match=r"every reward \('nan_reward'\) lost every score for 2 steps in "
                                                       r"a row, up to step 5; .* `max_missing_reward_steps` under stages.grpo"):
                ctx.check_rewards(step)
        else:
            ctx.check_rewards(step)


def test_a_step_with_non_finite_gradients_is_skipped_and_counted(tmp_path):
    import torch

    ctx = stage_context(tmp_path)
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    (layer(torch.tensor([[1.0, math.nan]])).sum()).backward()
    assert ctx.skip_nonfinite(list(layer.parameters()), 1) is True
    optimizer.step()  # grads are None: AdamW leaves the weights alone
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())) and ctx.skipped_steps == 1
    layer(torch.tensor([[1.0, 2.0]])).sum().backward()
    assert ctx.skip_nonfinite(list(layer.parameters()), 2) is False and ctx.skipped_steps == 1
    layer.bias.grad[0] = math.inf  # one inf in one of the tensors, the others finite
    assert ctx.skip_nonfinite(list(layer.parameters()), 3) is True and ctx.skipped_steps == 2
    assert layer.weight.grad is None and layer.bias.grad is None
