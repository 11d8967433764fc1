"""The field's pipelines under recipes/field/: each recipe validates and plans offline (hub ids for models and
data: the model's config.json is kept in recipes/field/configs/), and each folder has a README and make targets."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FIELD = ROOT / "recipes" / "field"
RECIPES = sorted(FIELD.glob("*/*.yaml"))


def cli(*args):
    from typer.testing import CliRunner

    from alignment.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_field_recipes_are_there():
    names = {p.parent.name for p in RECIPES}
    assert {"zephyr-7b", "instructgpt", "tulu3", "r1-zero", "kto"} <= names
    methods = " ".join(p.read_text() for p in RECIPES)
    for method in ("sft", "reward", "dpo", "kto", "grpo", "ppo", "dora"):
        assert f": {method}" in methods, method


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates_and_plans_offline(recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = cli("validate", "--offline", recipe)
    assert res.exit_code == 0, res.output
    res = cli("plan", recipe, "--json", "--gpu-mem", "80")
    assert res.exit_code == 0, res.output
    stages = json.loads(res.output)["stages"]
    assert stages and all(s["peak_gib"] > 0 and s["fits"] for s in stages.values()), stages


@pytest.mark.parametrize("folder", sorted({p.parent for p in RECIPES}), ids=lambda p: p.name)
def test_every_recipe_folder_has_a_readme_and_make_targets(folder):
    readme = folder / "README.md"
    assert readme.is_file() and "Source" in readme.read_text()
    for recipe in folder.glob("*.yaml"):
        target = f"field-{folder.name}-{recipe.stem}"
        out = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True)
        assert out.returncode == 0 and f"alignkit run recipes/field/{folder.name}/{recipe.name}" in out.stdout, out.stderr


def test_offline_validation_still_checks_local_files(tmp_path, tiny_model_path):
    from tests.helpers import write_recipe

    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft", "hub"]}},
                          data={"sft": {"path": "missing.jsonl"}, "hub": {"path": "org/some-dataset"}})
    res = cli("validate", "--offline", recipe)
    assert res.exit_code == 2 and "missing.jsonl" in res.output
