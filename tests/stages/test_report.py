"""run_evals over a run directory (base + finished stages, each a tiny model), its cache, the eval
table, and the report: files, sections, self-containment, and a headless-Chromium render."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from alignment.models import ARTIFACT_FILE
from alignment.recipe import Recipe, dump_recipe
from evals import EvalContext, run_evals, write_report
from evals.cli import print_eval_table
from tests.helpers import write_jsonl

PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
         {"prompt": "3+4=", "chosen": "7", "rejected": "8"}]
TEST = [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}, {"prompt": "2+3=", "answer": "5"},
        {"prompt": "4+4=", "answer": "8"}]
SFT = [{"prompt": "1+2=", "completion": "3"}, {"messages": [{"role": "user", "content": "2+2="},
                                                           {"role": "assistant", "content": "4"}]}]
GEN = {"backend": "hf", "max_new_tokens": 4}


def _stage(run_dir: Path, name: str, model: Path, *, fingerprint: str, metrics: list[dict], seconds: float,
           head: str = "causal_lm") -> None:
    shutil.copytree(model, run_dir / name / "model")
    (run_dir / name / "model" / ARTIFACT_FILE).write_text(json.dumps({"kind": "full", "base": None, "head": head}))
    (run_dir / name / "manifest.json").write_text(json.dumps({
        "stage": name, "status": "done", "fingerprint": fingerprint, "seconds": seconds,
        "inputs": {"from": "base" if name != "dpo" else "sft"}, "metrics": metrics[-1] if metrics else {}}))
    write_jsonl(run_dir / name / "metrics.jsonl", metrics)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path):
    """A finished run: sft (the tiny model), dpo (another seed), rm (a reward model), with curves."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from alignment.models import load_tokenizer
    from alignment.testing import make_tiny_llama

    root = tmp_path_factory.mktemp("report")
    data = {"test": write_jsonl(root / "test.jsonl", TEST), "pairs": write_jsonl(root / "pairs.jsonl", PAIRS),
            "sft": write_jsonl(root / "sft.jsonl", SFT)}
    recipe = Recipe.model_validate({
        "name": "r", "seed": 0, "model": {"name_or_path": str(tiny_model_path), "dtype": "float32"},
        "data": {k: {"path": str(v)} for k, v in data.items()},
        "stages": {"sft": {"method": "sft", "data": ["sft"]}, "rm": {"method": "reward", "data": ["pairs"]},
                   "dpo": {"method": "dpo", "from": "sft", "data": ["pairs"]}},
        "evals": [{"task": "accuracy", "data": "test", "args": {**GEN, "match": "exact", "k": 2}},
                  {"task": "length", "data": "test", "args": GEN},
                  {"task": "perplexity", "data": "sft"},
                  {"task": "preference_accuracy", "data": "pairs", "stages": ["dpo"]},
                  {"task": "win_rate", "data": "test", "args": {**GEN, "reward_stage": "rm"}},
                  {"task": "lm_eval", "args": {"tasks": ["gsm8k"]}}],
    })
    run_dir = root / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    sft_curve = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 10), "grad_norm": 1.0 + 0.1 * s}
                 for s in range(1, 11)] + [{"step": 10, "train_loss": 0.6, "train_runtime": 3.0}]
    dpo_curve = [{"step": s, "loss": 0.69 - 0.03 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.05 * s,
                  "rewards/margins": 0.15 * s, "rewards/accuracies": min(1.0, 0.5 + 0.1 * s)} for s in range(1, 9)]
    _stage(run_dir, "sft", tiny_model_path, fingerprint="f-sft", metrics=sft_curve, seconds=75.2)
    _stage(run_dir, "dpo", make_tiny_llama(root / "dpo-model", seed=1), fingerprint="f-dpo", metrics=dpo_curve, seconds=12)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny_model_path, num_labels=1))
    rm.save_pretrained(root / "rm-model")
    load_tokenizer(str(tiny_model_path)).save_pretrained(root / "rm-model")
    _stage(run_dir, "rm", root / "rm-model", fingerprint="f-rm", metrics=[], seconds=5, head="sequence_classification")
    return recipe, run_dir


def _console():
    return Console(file=io.StringIO(), width=200, highlight=False)


def _implicit_reward(run_dir: Path, prompt: str, completion: str, beta: float = 0.1) -> float:
    """beta * (log pi_dpo(completion + EOS | prompt) - log pi_sft(...)), one plain forward pass each."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.models import load_tokenizer

    tok = load_tokenizer(str(run_dir / "sft" / "model"))
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = []
    for stage in ("dpo", "sft"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage / "model")
        with torch.no_grad():
            logprobs = model(torch.tensor([p + c])).logits[0].double().log_softmax(-1)
        total.append(sum(logprobs[len(p) + i - 1, t].item() for i, t in enumerate(c)))  # token i predicted at i - 1
    return beta * (total[0] - total[1])


def test_run_evals_writes_results_and_caches_them(run, monkeypatch):
    recipe, run_dir = run
    console = _console()
    results = run_evals(recipe, run_dir, console=console)
    assert list(results) == ["base", "sft", "dpo"]  # rm is a reward model: not evaluated
    for st in results:
        saved = json.loads((run_dir / "evals" / f"{st}.json").read_text())
        assert saved == json.loads(json.dumps(results[st])) and saved["stage"] == st
    base, sft, dpo = (results[s]["tasks"] for s in ("base", "sft", "dpo"))
    assert set(base) == {"accuracy", "length", "perplexity", "preference_accuracy", "win_rate", "lm_eval"}
    assert "preference_accuracy" in dpo and "preference_accuracy" not in sft  # `stages: [dpo]`, and base
    assert "no reference model" in base["preference_accuracy"]["skipped"]
    acc = base["accuracy"]
    assert set(acc["metrics"]) == {"accuracy", "pass@2"} and len(acc["samples"]) == 3
    assert acc["samples"][0]["prompt"] == "1+1=" and {"completion", "answer", "correct"} <= set(acc["samples"][0])
    # sft is the base model copied: identical numbers, and base vs itself ties on every prompt
    assert sft["accuracy"]["metrics"] == acc["metrics"] and sft["perplexity"]["metrics"] == base["perplexity"]["metrics"]
    assert base["win_rate"]["metrics"]["win_rate"] == 0.5 == sft["win_rate"]["metrics"]["win_rate"]
    assert dpo["perplexity"]["metrics"]["perplexity"] != base["perplexity"]["metrics"]["perplexity"]
    assert base["lm_eval"]["skipped"].startswith("lm-eval is not installed")
    # the implicit DPO reward by hand: 0.1 * (log pi_dpo - log pi_sft) of "answer<eos>" after the prompt
    margins = [_implicit_reward(run_dir, row["prompt"], row["chosen"]) - _implicit_reward(run_dir, row["prompt"], row["rejected"])
               for row in PAIRS]
    pref = dpo["preference_accuracy"]
    assert [s["margin"] for s in pref["samples"]] == pytest.approx(margins, abs=1e-5)
    assert pref["metrics"]["accuracy"] == sum(m > 0 for m in margins) / 3
    assert pref["metrics"]["margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)

    # unchanged: everything cached, nothing generated or scored
    def boom(*args, **kwargs):
        raise AssertionError("re-evaluated a cached result")

    monkeypatch.setattr(EvalContext, "generate", boom)
    monkeypatch.setattr(EvalContext, "token_logprobs", boom)
    monkeypatch.setattr(EvalContext, "reward_scores", boom)
    console = _console()
    assert run_evals(recipe, run_dir, console=console) == results
    assert console.file.getvalue().count("cached") == 6 + 5 + 6

    # a retrained dpo: only dpo's results are stale (base and sft stay cached)
    monkeypatch.undo()
    man = json.loads((run_dir / "dpo" / "manifest.json").read_text())
    (run_dir / "dpo" / "manifest.json").write_text(json.dumps({**man, "fingerprint": "f-dpo-2"}))
    console = _console()
    again = run_evals(recipe, run_dir, stages=["dpo"], tasks=["length"], console=console)
    out = console.file.getvalue()
    assert "eval dpo · length: mean" in out and "base · length: cached" in out and "sft" not in again
    assert again["dpo"]["tasks"]["accuracy"] == dpo["accuracy"]  # not asked for: kept as it was

    table = _console()
    print_eval_table(results, table)
    text = table.file.getvalue()
    assert "accuracy" in text and "perplexity" in text and "skipped" in text and "base" in text and "dpo" in text


def test_report_is_one_self_contained_file_with_every_section(run):
    recipe, run_dir = run
    if not (run_dir / "evals" / "base.json").exists():
        run_evals(recipe, run_dir, console=_console())
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text()
    for section in ("id='stages'", "id='evals'", "id='curves'", "id='samples'", "id='recipe'"):
        assert section in page
    assert "class='evals'" in page and "class='samples'" in page and "pass@2" in page
    images = re.findall(r"<img[^>]+src='([^']+)'", page)
    assert len(images) == 3 and all(src.startswith("data:image/svg+xml;base64,") for src in images)  # evals, sft, dpo
    for src in images:
        ET.fromstring(base64.b64decode(src.split(",", 1)[1]))  # a well-formed SVG
    urls = re.findall(r"(?:src|href)=['\"]([^'\"]*)['\"]", page)
    assert urls and all(u.startswith(("data:", "#")) for u in urls)  # no outside assets
    assert "<link" not in page and "<script" not in page
    assert "lm-eval is not installed" in page and "f-sft" in page and "1m 15s" in page
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Evals" in md and "| accuracy | **accuracy** |" in md and "## Sample generations" in md
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert plots == ["evals.svg", "curves-00-sft.svg", "curves-02-dpo.svg"]  # rm (index 1) logged no curves
    for name in plots:
        assert ET.parse(run_dir / "report" / name).getroot().tag == "{http://www.w3.org/2000/svg}svg"


@pytest.fixture(scope="session")
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # tests never install anything; `make test` installs it where apt-get can
        pytest.skip("chromium is not installed (`make test` installs it with apt-get where it can)")
    return exe


def _chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(run, chromium, tmp_path):
    recipe, run_dir = run
    if not (run_dir / "evals" / "base.json").exists():
        run_evals(recipe, run_dir, console=_console())
    index = write_report(run_dir)
    dom = _chromium(chromium, tmp_path, "--dump-dom", index.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<table") >= 3 and "class=\"evals\"" in html and "class=\"samples\"" in html
    assert html.count('src="data:image/svg+xml;base64,') == 3
    shot = tmp_path / "report.png"
    res = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars", index.as_uri())
    assert res.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("ALIGNKIT_KEEP_SCREENSHOT"):  # for a look by eye
        shutil.copy(shot, os.environ["ALIGNKIT_KEEP_SCREENSHOT"])


def _cli():
    import typer

    from evals.cli import eval_cmd, report_cmd

    app = typer.Typer()  # as alignment.cli registers them
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
    return app


def test_cli_eval_recipe_model_and_report(run, tiny_model_path, tmp_path):
    import yaml
    from typer.testing import CliRunner

    recipe, run_dir = run
    app, runner = _cli(), CliRunner()
    if not (run_dir / "evals" / "base.json").exists():
        run_evals(recipe, run_dir, console=_console())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True)))
    res = runner.invoke(app, ["eval", str(path), "--stage", "dpo", "--run-dir", str(run_dir.parent)])
    assert res.exit_code == 0, res.output
    assert "cached" in res.output and "evals" in res.output and "perplexity" in res.output

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}])
    res = runner.invoke(app, ["eval", "--model", str(tiny_model_path), "--task", "length", "--data", str(data),
                              "--arg", "backend=hf", "--arg", "max_new_tokens=3"])
    assert res.exit_code == 0, res.output
    rows = dict(re.findall(r"│\s*(mean|max|truncated_frac)\s*│\s*(\S+)\s*│", res.output))
    assert rows == {"mean": "3", "max": "3", "truncated_frac": "1"}, res.output  # a random model runs to the limit

    res = runner.invoke(app, ["eval", "--model", str(tiny_model_path), "--task", "length"])
    assert res.exit_code == 2 and "needs a dataset" in res.output and "--data FILE" in res.output
    res = runner.invoke(app, ["eval"])
    assert res.exit_code == 2 and "give a RECIPE, or --model" in res.output

    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and "index.html" in res.output and "report.md" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "not a run directory" in res.output


def test_cli_eval_model_system_prompt(tiny_model_path, tmp_path):
    """`alignkit eval --model --data --system-prompt`: as a recipe data set's `system_prompt`, the message goes first
    into every conversation without a system message of its own, and the rows changed are counted; misused, the
    option ends the command with exit 2 and says why."""
    from typer.testing import CliRunner

    app, runner = _cli(), CliRunner()
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": "1+1="}]},
        {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2="}]},
        {"prompt": [{"role": "user", "content": "3+3="}]},
    ])
    model = ["eval", "--model", str(tiny_model_path), "--task", "length", "--arg", "backend=hf", "--arg", "max_new_tokens=2"]
    res = runner.invoke(app, [*model, "--data", str(chat), "--system-prompt", "Answer with the number only."])
    assert res.exit_code == 0, res.output
    out = res.output.replace("\n", "")
    assert "2 row(s) system_prompt" in out and f"{chat}:1; {chat}:3" in out, res.output

    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "1+1="}])
    res = runner.invoke(app, [*model, "--data", str(text), "--system-prompt", ""])
    assert res.exit_code == 2 and f"{text}:1" in res.output.replace("\n", "") and "system_prompt" in res.output
    res = runner.invoke(app, ["eval", "--model", str(tiny_model_path), "--task", "lm_eval", "--arg", 'tasks=["hellaswag"]',
                              "--system-prompt", "x"])  # a task that takes no --data
    assert res.exit_code == 2 and "--system-prompt needs --data FILE" in res.output, res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "recipe.yaml"), "--system-prompt", "x"])
    assert res.exit_code == 2 and "--system-prompt is for --model" in res.output
