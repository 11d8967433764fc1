"""Helpers for tests: write small datasets and recipes next to each other in a tmp folder."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import yaml


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sum_rows(n: int, seed: int = 0) -> list[dict]:
    """prompt/completion chat rows 'What is a+b?' -> 'a+b' for a, b in 1..9."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                     "completion": [{"role": "assistant", "content": str(a + b)}]})
    return rows


def write_recipe(folder: Path, model_path, stages: dict, *, data: dict | None = None, **top) -> Path:
    """A recipe YAML in `folder` over the tiny model, with an `sft` dataset of sums by default."""
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        write_jsonl(folder / "sft.jsonl", sum_rows(64))
        data = {"sft": {"path": "sft.jsonl"}}
    recipe = {"name": top.pop("name", "t"), "seed": 0,
              "model": {"name_or_path": str(model_path), "dtype": "float32", **top.pop("model", {})},
              "data": data, "stages": stages, **top}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metrics(run_dir: Path, stage: str) -> list[dict]:
    from alignment.rundir import RunDir

    return RunDir(run_dir).read_metrics(stage)


def losses(run_dir: Path, stage: str, key: str = "loss") -> list[float]:
    return [m[key] for m in metrics(run_dir, stage) if key in m]


def run_cli(*args, env=None):
    """`alignkit run ARGS...` in this process (typer's CliRunner), with `env` set for the call."""
    from typer.testing import CliRunner

    from alignment.cli import app

    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return CliRunner().invoke(app, ["run", *map(str, args)])
    finally:
        os.environ.clear()
        os.environ.update(old)


def manifest(run_dir: Path, stage: str) -> dict:
    from alignment.rundir import RunDir

    return RunDir(run_dir).read_manifest(stage)


def pair_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """Chat preference rows 'a+b=' -> chosen 'a+b', rejected 'no idea'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": "no idea"}]})
    return rows
