"""`alignkit export RUN_DIR [--stage S] --out DIR [--push-to-hub REPO] [--dtype bf16]`: a finished stage as a
model people serve and share.

The folder holds the stage's full weights -- the adapters of its whole lineage merged into the base (each stage's
adapter sits on its `from` stage's merged weights, `alignment.rundir.full_weights`), 4-bit weights dequantized --
as safetensors only, the tokenizer with its chat template, `generation_config.json`, and a model card
(`README.md`): the recipe, the stage lineage, the data sets with their digests and the eval table.

The export is written into a temp folder beside `--out` and renamed into place only when complete and checked:
a cut-off export never looks finished. The check loads the folder back through the rollout engine (vLLM where
it imports) and generates the same greedy answers as the stage's own weights.

    alignkit export runs/quickstart-arith --out exports/arith --dtype bf16 --push-to-hub me/smollm2-arith
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from alignment.recipe import BASE, Recipe
from alignment.rundir import RunDir

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype; auto: the base's
CHECK_PROMPTS = 8  # prompts the check generates for (greedy)
CHECK_TOKENS = 32  # tokens per greedy answer in the check
WEIGHT_SUFFIXES = (".safetensors",)  # the only weight files an export holds
CARD = "README.md"


class ExportError(ValueError):
    """An export that cannot be made as asked (the CLI exits 2 with the message)."""


def lineage(recipe: Recipe, stage: str) -> list[str]:
    """The stages whose weights make `stage`'s model, first to last, following `from:` (base not included):
    `["sft", "dpo", "grpo"]` for a grpo stage from dpo, from sft. Reward-model stages it scored with are not in it."""
    chain = []
    while stage != BASE:
        chain.append(stage)
        stage = recipe.stages[stage].from_
    return chain[::-1]


def check_exportable(rundir: RunDir, stage: Optional[str], out: Path) -> tuple[Recipe, str]:
    """The run's recipe and the stage to export (default: the last stage in pipeline order).

    Raises:
        ExportError: not a run directory; an unknown stage; a stage not done; `out` exists and is not empty.
    """
    from alignment.registry import did_you_mean

    if not rundir.recipe_file.exists():
        raise ExportError(f"{rundir.path} is not a run directory (no recipe.yaml); run `alignkit run RECIPE` first")
    recipe = rundir.read_recipe()
    stage = stage or recipe.order()[-1]
    if stage not in recipe.stages:
        raise ExportError(f"no stage '{stage}' in {rundir.path}{did_you_mean(stage, recipe.stages)}; "
                          f"stages: {', '.join(recipe.order())}")
    if rundir.done(stage) is None:
        status = (rundir.read_manifest(stage) or {}).get("status", "not started")
        raise ExportError(f"stage '{stage}' of {rundir.path} is not done ({status}); finish it first: "
                          f"alignkit run RECIPE --stage {stage}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; name a new folder (an export never overwrites)")
    return recipe, stage


def _dtype(name: str, recipe: Recipe):
    """torch dtype of `--dtype` (`auto`: the one the recipe's base model's config names -- merged stages are kept
    in float32 -- else float32)."""
    import torch
    from transformers import AutoConfig

    from alignment.models import resolve_model_path

    if name not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    chosen = DTYPES[name] or getattr(AutoConfig.from_pretrained(resolve_model_path(recipe.model.name_or_path)),
                                     "dtype", None) or torch.float32
    return getattr(torch, chosen) if isinstance(chosen, str) else chosen


def _shareable(folder: Path) -> None:
    """Every file of `folder` with the mode a plain write under this umask gives (0644 under umask 022): the
    weights come from a private temp file (0600), and an export is made to be read by others (a server, a hub)."""
    probe = folder / ".mode-probe"
    probe.touch()  # a plain write's mode, read back: os.umask can only be read by setting it, racing other threads
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def save_weights(weights: str, head: str, dtype, into: Path) -> None:
    """Full weights from `weights` (a merged stage folder) into `into`: dequantized, cast to `dtype`, safetensors
    only, with the tokenizer (chat template included) and, for a generating model, `generation_config.json`."""
    import transformers
    from transformers import GenerationConfig

    from alignment.models import HEAD_KWARGS, HEADS, load_tokenizer

    model = getattr(transformers, HEADS[head]).from_pretrained(weights, dtype=dtype, **HEAD_KWARGS.get(head, {}))
    if getattr(model, "hf_quantizer", None) is not None:  # a 4-bit / 8-bit base: full-precision weights out
        model = model.dequantize().to(dtype)
    tokenizer = load_tokenizer(weights)
    if head == "causal_lm":
        try:
            model.generation_config = GenerationConfig.from_pretrained(weights)
        except OSError:  # the folder has none: derive it from the model config
            model.generation_config = GenerationConfig.from_model_config(model.config)
        for key in ("eos_token_id", "pad_token_id"):
            if getattr(model.generation_config, key) is None:
                setattr(model.generation_config, key, getattr(tokenizer, key))
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    model.save_pretrained(into)  # safetensors (transformers 5 writes nothing else)
    tokenizer.save_pretrained(into)
    other = [p.name for p in into.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if other:
        raise ExportError(f"the export would hold non-safetensors weights {other}; refusing")


# ---------------------------------------------------------------- the model card


def _card_front_matter(recipe: Recipe, stage: str, head: str) -> dict:
    base = recipe.model.name_or_path
    meta = {"library_name": "transformers", "tags": ["alignkit"] + [recipe.stages[s].method for s in lineage(recipe, stage)],
            "pipeline_tag": "text-generation" if head == "causal_lm" else "text-classification"}
    if not base.startswith("bundled:") and not Path(base).is_absolute():
        meta["base_model"] = base  # a hub id: the hub links the card to it
    hub_data = sorted({recipe.data[r.name].path for s in lineage(recipe, stage) for r in recipe.stages[s].data
                       if not Path(recipe.data[r.name].path).is_absolute()})
    if hub_data:
        meta["datasets"] = hub_data
    return meta


LAST_LOGGED = ("rewards/margins", "rewards/accuracies", "accuracy", "margin")  # preference and reward-model rewards


def final_metrics(summary: dict, rows: list[dict]) -> list[str]:
    """The card's "final metrics" of a stage: from its manifest's `summary` the mean `train_loss` over the stage
    and an RL stage's mean reward over the first -> last quarter of its steps; from its logged `rows`
    (`RunDir.read_metrics`) the last value of each `LAST_LOGGED` key (dpo / kto implicit rewards, the reward
    model's pair accuracy and margin) where the stage logs it."""
    from evals.table import fmt

    out = [f"train_loss {fmt(summary['train_loss'])}"] if isinstance(summary.get("train_loss"), (int, float)) else []
    if isinstance(summary.get("reward/first_quarter"), (int, float)):
        out.append(f"reward {fmt(summary['reward/first_quarter'])} → {fmt(summary['reward/last_quarter'])}")
    last = {k: v for row in rows for k, v in row.items() if k in LAST_LOGGED and isinstance(v, (int, float))}
    return out + [f"{k} {fmt(last[k])}" for k in LAST_LOGGED if k in last]


def model_card(rundir: RunDir, recipe: Recipe, stage: str, head: str, dtype) -> str:
    """`README.md` of an export: front matter for the hub, the lineage with its data sets (digests from the stage
    manifests), final training metrics, the eval table (`evals.table`) and the resolved recipe."""
    from alignment.recipe import dump_recipe
    from evals.report import markdown_eval_table
    from evals.table import build_eval_table

    chain = lineage(recipe, stage)
    front = yaml.safe_dump(_card_front_matter(recipe, stage, head), sort_keys=False).strip()
    out = ["---", front, "---", "", f"# {recipe.name} · {stage}", "",
           f"Made with alignkit from `{recipe.model.name_or_path}` by "
           f"{' → '.join(f'{s} ({recipe.stages[s].method})' for s in chain)}; every adapter merged into the "
           f"weights, saved as {str(dtype).removeprefix('torch.')} safetensors.", "",
           "## Stages", "", "| stage | method | from | adapter | data | final metrics | fingerprint |",
           "|---|---|---|---|---|---|---|"]
    datasets: dict[str, str] = {}
    for s in chain:
        man = rundir.read_manifest(s) or {}
        inputs = man.get("inputs", {})
        for name, d in (inputs.get("data") or {}).items():
            datasets[name] = d.get("digest", "")
        model = recipe.stage_model(s)
        adapter = f"{model.adapter.method} r={model.adapter.r}" if model.adapter else "full"
        if model.quantization:
            adapter += f", {model.quantization.bits}-bit base"
        final = ", ".join(final_metrics(man.get("metrics") or {}, rundir.read_metrics(s))) or "–"
        out.append(f"| {s} | {recipe.stages[s].method} | {recipe.stages[s].from_} | {adapter} | "
                   f"{', '.join(r.name for r in recipe.stages[s].data) or '–'} | {final} | {man.get('fingerprint', '')} |")
    out += ["", "## Data", "", "| dataset | source | system prompt | digest (sha256 of the file : of the options) |",
            "|---|---|---|---|"]
    system_prompts = {}  # dataset -> the system message put first in its conversations (`system_prompt`)
    for name, digest in datasets.items():
        cfg = recipe.data[name]
        source = Path(cfg.path).name if Path(cfg.path).is_absolute() else f"{cfg.path} ({cfg.split})"
        if cfg.system_prompt is not None:
            system_prompts[name] = json.dumps(cfg.system_prompt).replace("|", "\\|")  # quoted, one line
        out.append(f"| {name} | {source} | {system_prompts.get(name, '–')} | `{digest}` |")
    evals = {s: e for s in [BASE] + chain if (e := rundir.read_evals(s)) is not None}
    out += ["", "## Evals", ""]
    table = build_eval_table(evals, [BASE] + chain)
    out += markdown_eval_table(table) if table.tasks else ["No eval results in the run directory."]
    out += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH_OR_REPO)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH_OR_REPO)  # with its chat template", "```"]
    if system_prompts:
        shown = ", ".join(sorted(set(system_prompts.values())))
        out += ["", f"Trained with a system message first in every conversation ({shown}: the data's `system_prompt` "
                "above): start a conversation with the same one; without one, the chat template may put its own "
                "default system message there."]
    out += ["", "## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- the check


def check_prompts(recipe: Recipe, stage: str, n: int = CHECK_PROMPTS) -> list:
    """Up to `n` prompts for the check: from the recipe's first eval data set, else the stage's training data."""
    from alignment.data import load
    from evals.tasks import row_prompt

    names = [ev.data for ev in recipe.evals if ev.data] + [r.name for r in recipe.stages[stage].data]
    for name in names:
        prompts = []
        for row in load(name, recipe.data[name]).rows:
            try:
                prompts.append(row_prompt(row))
            except ValueError:  # e.g. a text row: no prompt to generate from
                continue
            if len(prompts) == n:
                break
        if prompts:
            return prompts
    raise ExportError(f"no prompts to check the export with: stage '{stage}' and the evals have no prompt rows")


def greedy_answers(model_path: str, prompts: list, *, backend: str, dtype: str) -> list[str]:
    """Greedy completions of `prompts` by the model in `model_path`, through `alignment.rollout.make_engine`."""
    from alignment.models import load_tokenizer
    from alignment.rollout import SamplingConfig, encode_prompts, make_engine

    tokenizer = load_tokenizer(model_path)
    engine = make_engine(backend, model_path, tokenizer=tokenizer, dtype=dtype, max_model_len=512)
    try:
        out = engine.generate(encode_prompts(tokenizer, prompts), SamplingConfig(max_new_tokens=CHECK_TOKENS, temperature=0.0))
    finally:
        engine.close()
    return [group[0].text for group in out]


def check_export(folder: Path, stage_weights: str, prompts: list, *, backend: str, dtype) -> list[str]:
    """Generate greedily with the stage's weights and with the export (both in `dtype`, the same engine); the
    answers must be the same.

    Raises:
        ExportError: an answer differs (names the prompt and both answers).
    """
    name = str(dtype).removeprefix("torch.")
    expected = greedy_answers(stage_weights, prompts, backend=backend, dtype=name)
    got = greedy_answers(str(folder), prompts, backend=backend, dtype=name)
    for prompt, a, b in zip(prompts, expected, got):
        if a != b:
            raise ExportError(f"the export answers {b!r} where the stage answers {a!r} (greedy, prompt {prompt!r}); "
                              f"the export was not written")
    return got


# ---------------------------------------------------------------- entry point


def export(run_dir: Path | str, out: Path | str, *, stage: Optional[str] = None, dtype: str = "auto",
           check: bool = True, backend: str = "auto", push_to_hub: Optional[str] = None, log=print) -> Path:
    """Export a finished stage of a run (see the module docstring); returns `out`.

    Args:
        run_dir: the run directory (`runs/NAME`).
        out: the new folder (must not exist, or be empty).
        stage: the stage to export; default: the last stage in pipeline order.
        dtype: `auto` (the base model's), `bf16`, `fp16` or `fp32`.
        check: reload through the rollout engine and compare greedy answers with the stage's before finishing.
        backend: the rollout engine of the check (`auto`: vLLM where it imports).
        push_to_hub: then upload the folder to this hub repo (`push`).
        log: where progress lines go.

    Raises:
        ExportError: see `check_exportable`, `check_export`.
    """
    from alignment.models import read_artifact
    from alignment.rundir import full_weights

    rundir, out = RunDir(Path(run_dir).resolve()), Path(out).resolve()
    recipe, stage = check_exportable(rundir, stage, out)
    torch_dtype = _dtype(dtype, recipe)
    head = read_artifact(rundir.model_dir(stage))["head"]
    weights = str(full_weights(rundir.model_dir(stage)))  # adapters of the lineage merged, once, under a lock
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log(f"export {stage} ({' → '.join(lineage(recipe, stage))}) as {str(torch_dtype).removeprefix('torch.')} → {out}")
        save_weights(weights, head, torch_dtype, tmp)
        (tmp / CARD).write_text(model_card(rundir, recipe, stage, head, torch_dtype), encoding="utf-8")
        if check and head == "causal_lm":
            prompts = check_prompts(recipe, stage)
            check_export(tmp, weights, prompts, backend=backend, dtype=torch_dtype)
            log(f"checked: {len(prompts)} greedy answers of the export match the stage's")
        _shareable(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above): the rename needs the name free
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        log(f"pushed: {push(out, push_to_hub)}")
    return out


def push(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export to the hub (`huggingface_hub.HfApi`: create_repo, then upload_folder); returns the repo URL.
    The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`)."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"alignkit export of {folder.name}")
    return str(url)
