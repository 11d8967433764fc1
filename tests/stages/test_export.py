"""`alignkit export` (alignment/export.py) on a real run of the tiny model: sft -> sft2, both LoRA, so the export
merges a lineage of two adapters. The folder holds safetensors, tokenizer with chat template, generation config
and a model card; loaded back through the rollout engine it answers greedily as the stage did in its evals; it
refuses what it cannot do (exit 2), leaves nothing half-written, and pushes to a stand-in hub."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignment import export as export_mod
from alignment.cli import app
from evals.table import fmt
from tests.helpers import run_cli, sum_rows, write_jsonl, write_recipe

LORA = {"adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}
ARGS = {"learning_rate": 3e-3, "max_steps": 4, "per_device_train_batch_size": 8, "save_steps": 100}
TEST = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1)]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    """sft (LoRA) -> sft2 (LoRA from sft), evaluated greedily (hf) on three held-out sums; the training data
    carry a system prompt."""
    root = tmp_path_factory.mktemp("export")
    write_jsonl(root / "sft.jsonl", sum_rows(64))
    write_jsonl(root / "test.jsonl", TEST)
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": ARGS},
              "sft2": {"method": "sft", "from": "sft", "data": ["sft"], "args": {**ARGS, "seed": 1}}}
    recipe = write_recipe(root, tiny_model_path, stages, model=LORA,
                          data={"sft": {"path": "sft.jsonl", "system_prompt": "Add | sum."}, "test": {"path": "test.jsonl"}},
                          evals=[{"task": "accuracy", "data": "test",
                                  "args": {"backend": "hf", "max_new_tokens": export_mod.CHECK_TOKENS}}])
    res = run_cli(recipe, "--run-dir", root / "runs", env={"OMP_NUM_THREADS": "1"})
    assert res.exit_code == 0, res.output
    return root / "runs" / "t"


def export_cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_export_is_the_merged_lineage_and_answers_as_the_stage_did(run_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.rundir import full_weights

    out = tmp_path / "model"
    res = export_cli(run_dir, "--out", out, "--backend", "hf")  # default stage: the last one, sft2
    assert res.exit_code == 0, res.output
    assert "checked: 3 greedy answers" in res.output

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth")) or f == "alignkit_model.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {f: oct(0o666 & ~umask) for f in files}
    assert AutoTokenizer.from_pretrained(out).chat_template  # the chat template travels with it
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 1 and generation["pad_token_id"] == 0

    # the weights are sft's adapter merged into the base, then sft2's on top: the same logits as the stage's
    # merged folder, and different from the base and from sft alone (both adapters matter)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = {name: AutoModelForCausalLM.from_pretrained(path)(ids).logits
              for name, path in [("export", out), ("sft2", full_weights(run_dir / "sft2" / "model")),
                                 ("sft", full_weights(run_dir / "sft" / "model")),
                                 ("base", json.loads((run_dir / "sft" / "model" / "alignkit_model.json").read_text())["base"])]}
    assert torch.allclose(logits["export"], logits["sft2"], atol=1e-6)
    assert not torch.allclose(logits["export"], logits["sft"], atol=1e-3)
    assert not torch.allclose(logits["sft"], logits["base"], atol=1e-3)
    with safe_open(out / "model.safetensors", "pt") as fh:  # auto: the tiny base's own dtype
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.float32

    # the same greedy answers as the stage gave in its eval (recorded by `alignkit run`), through the rollout engine
    recorded = json.loads((run_dir / "evals" / "sft2.json").read_text())["tasks"]["accuracy"]["samples"]
    answers = export_mod.greedy_answers(str(out), [r["prompt"] for r in TEST], backend="hf", dtype="float32")
    assert answers == [s["completion"] for s in recorded]

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "sft (sft) → sft2 (sft)" in card and "| sft2 | sft | sft | lora r=8 |" in card
    digest = json.loads((run_dir / "sft" / "manifest.json").read_text())["inputs"]["data"]["sft"]["digest"]
    assert f'| sft | sft.jsonl | "Add \\| sum." | `{digest}` |' in card  # the data set's system_prompt, | escaped
    assert 'Trained with a system message first in every conversation ("Add \\| sum."' in card
    assert "| accuracy | **accuracy** |" in card and "## Recipe" in card
    for stage in ("sft", "sft2"):  # each stage's mean train loss in its lineage row
        loss = json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]["train_loss"]
        assert f"| train_loss {fmt(loss)} |" in card


def test_the_card_gives_each_stage_its_train_loss_and_rewards():
    grpo = {"train_runtime": 8.0, "train_samples_per_second": 2.0, "train_steps_per_second": 0.5, "total_flos": 1e9,
            "train_loss": 0.0123, "reward/first_quarter": 0.25, "reward/last_quarter": 0.5}
    assert export_mod.final_metrics(grpo, [{"step": 1, "reward/mean": 0.25}]) == ["train_loss 0.0123", "reward 0.25 → 0.5"]
    rows = [{"step": 1, "loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.5},
            {"step": 2, "loss": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 0.75}, {"step": 2, "train_loss": 0.65}]
    assert export_mod.final_metrics({"train_loss": 0.65}, rows) == [
        "train_loss 0.65", "rewards/margins 0.2", "rewards/accuracies 0.75"]  # dpo: the last logged rewards
    assert export_mod.final_metrics({}, []) == []


def test_bf16_export(run_dir, tmp_path):
    import torch
    from safetensors import safe_open

    out = tmp_path / "bf16"
    res = export_cli(run_dir, "--out", out, "--stage", "sft", "--dtype", "bf16", "--backend", "hf")
    assert res.exit_code == 0, res.output
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    assert "sft (sft); every adapter merged" in (out / "README.md").read_text()


@pytest.mark.vllm
def test_the_check_runs_through_vllm(run_dir, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    out = tmp_path / "vllm"
    res = export_cli(run_dir, "--out", out, "--backend", "vllm")
    assert res.exit_code == 0, res.output
    assert "checked: 3 greedy answers" in res.output
    recorded = json.loads((run_dir / "evals" / "sft2.json").read_text())["tasks"]["accuracy"]["samples"]
    answers = export_mod.greedy_answers(str(out), [r["prompt"] for r in TEST], backend="vllm", dtype="float32")
    assert answers == [s["completion"] for s in recorded]


def test_refusals_exit_2_with_a_clear_message(run_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("mine")
    res = export_cli(run_dir, "--out", busy, "--no-check")
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert (busy / "x").read_text() == "mine"

    res = export_cli(run_dir, "--out", tmp_path / "a", "--stage", "sfft", "--no-check")
    assert res.exit_code == 2 and "no stage 'sfft'" in res.output and "did you mean 'sft'" in res.output.lower()

    failed = tmp_path / "failed-run"
    shutil.copytree(run_dir, failed, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    manifest = json.loads((failed / "sft2" / "manifest.json").read_text())
    (failed / "sft2" / "manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    res = export_cli(failed, "--out", tmp_path / "b", "--no-check")
    assert res.exit_code == 2 and "stage 'sft2'" in res.output and "is not done (failed)" in res.output
    assert not (tmp_path / "b").exists()

    res = export_cli(tmp_path, "--out", tmp_path / "c")
    assert res.exit_code == 2 and "not a run directory" in res.output

    res = export_cli(run_dir, "--out", tmp_path / "d", "--dtype", "fp8")
    assert res.exit_code == 2 and "--dtype must be one of auto, bf16, fp16, fp32 (got 'fp8')" in res.output


def test_a_cut_off_export_leaves_nothing_that_looks_finished(run_dir, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if cut off while writing the card, after the weights

    monkeypatch.setattr(export_mod, "model_card", crash)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(run_dir, out, check=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no folder, no temp left behind


def test_push_to_hub_uploads_the_folder(run_dir, tmp_path, monkeypatch):
    """A stand-in for huggingface_hub.HfApi that copies into a local folder (no network)."""
    import huggingface_hub

    hub, calls = tmp_path / "hub", []

    class FakeHfApi:
        def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, repo_type, exist_ok))
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
            calls.append(("upload_folder", repo_id, repo_type))
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "out"
    res = export_cli(run_dir, "--out", out, "--no-check", "--push-to-hub", "me/tiny-sums")
    assert res.exit_code == 0, res.output
    assert calls == [("create_repo", "me/tiny-sums", "model", True), ("upload_folder", "me/tiny-sums", "model")]
    assert "pushed: https://hub.example/me/tiny-sums" in res.output
    assert sorted(p.name for p in (hub / "me" / "tiny-sums").iterdir()) == sorted(p.name for p in out.iterdir())
    assert (hub / "me" / "tiny-sums" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
