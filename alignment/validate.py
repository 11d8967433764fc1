"""Load a recipe for use: the schema (`alignment.recipe`), then the rules that need the registries --
stage methods and their TRL args, reward names and parameters, eval tasks -- then the registered defaults
(a `rollout:` section for methods that generate) and absolute paths.

Every problem is collected and raised once as a `RecipeError` naming file:line and key (the CLI exits 2).
"""
from __future__ import annotations

import dataclasses
import graphlib
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from alignment.recipe import BASE, Problem, Recipe, RecipeError, RolloutConfig, line_for, parse_recipe
from alignment.registry import did_you_mean
from alignment.stages import STAGES, load_stages
from alignment.tracking import missing_packages
from evals import TASKS, check_task_args, check_task_data
from rewards import build_reward

# Keys alignkit sets itself; a recipe setting them would be silently overridden.
RESERVED_ARGS = {"output_dir", "resume_from_checkpoint", "report_to", "overwrite_output_dir"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_recipe(path: str | Path, *, check_args: bool = True) -> Recipe:
    """Parse and validate a recipe file; fill registered defaults; relative data/launch paths become absolute.

    Args:
        path: the recipe YAML.
        check_args: check each stage's `args` against its method's config class.

    Raises:
        RecipeError: every problem found, each with file:line and key path.
    """
    path = Path(path)
    recipe, lines = parse_recipe(path)
    _fill_rollouts(recipe)
    _upgrade_args(recipe, lines, path)
    _absolutize(recipe, path.parent.resolve())  # first: checks that read a teacher's or judge's files find them
    problems = check_recipe(recipe, check_args=check_args) + _check_launch(recipe, path.parent.resolve())
    for p in problems:
        p.line = p.line or line_for(lines, p.path)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _fill_rollouts(recipe: Recipe) -> None:
    """Stages whose method generates get the whole `rollout:` section (its defaults), so the method's checks
    and the resolved recipe see every generation setting."""
    load_stages()
    for st in recipe.stages.values():
        if st.rollout is None and st.method in STAGES and STAGES.get(st.method).generates:
            st.rollout = RolloutConfig()


def _upgrade_args(recipe: Recipe, lines, path: Path) -> None:
    """Arguments a method has renamed since a recipe was written are read under their new names (the method's
    `upgrade`), each rewrite told on stderr with its file:line -- an old recipe keeps working and says how to
    update it."""
    for name, st in recipe.stages.items():
        upgrade = STAGES.get(st.method).upgrade if st.method in STAGES else None
        for note in upgrade(recipe, name) if upgrade else []:
            key = ".".join(map(str, note.path))
            print(f"alignkit: warning: {path}:{line_for(lines, note.path) or 1}: {key}: {note.message}", file=sys.stderr)


def _absolutize(recipe: Recipe, base: Path) -> None:
    for ds in recipe.data.values():
        local = base / ds.path
        if local.exists() or ds.path.startswith((".", "/")) or Path(ds.path).suffix in DATA_SUFFIXES:
            ds.path = str(local.resolve())
    for launch in [recipe.launch] + [s.launch for s in recipe.stages.values() if s.launch]:
        if launch.accelerate_config:
            cfg = base / launch.accelerate_config
            launch.accelerate_config = str(cfg.resolve() if cfg.exists() else cfg)
    name = recipe.model.name_or_path
    if not name.startswith("bundled:") and (base / name).is_dir():
        recipe.model.name_or_path = str((base / name).resolve())
    for st in recipe.stages.values():  # a teacher or judge folder beside the recipe (a stage name is no folder)
        if st.teacher and st.teacher not in recipe.stages and (base / st.teacher).is_dir():
            st.teacher = str((base / st.teacher).resolve())
        for r in st.rewards:
            folder = (r.model_extra or {}).get("model") if r.name == "judge" else None
            if isinstance(folder, str) and folder not in recipe.stages and (base / folder).is_dir():
                r.model_extra["model"] = str((base / folder).resolve())


def _check_launch(recipe: Recipe, base: Path) -> list[Problem]:
    """Each `launch.accelerate_config` (the recipe's and the stages') names a file that `check_accelerate_config`
    accepts; its problems name the recipe key and, in the message, the config file's line."""
    launches = [(("launch",), recipe.launch)] + [(("stages", n, "launch"), s.launch) for n, s in recipe.stages.items() if s.launch]
    problems = []
    for where, launch in launches:
        if launch.accelerate_config:
            config = base / launch.accelerate_config
            problems += [Problem(where + ("accelerate_config",), msg) for msg in check_accelerate_config(config)]
    return problems


FSDP_NEEDS_GPUS = (
    "FSDP needs CUDA GPUs and this machine has none: on CPU accelerate (1.15) never sets FSDP up -- its gloo path "
    "wraps the model in plain DDP, so the stage would run unsharded. Run it on GPUs; for several CPU processes use "
    "`launch: {num_processes: N}` (DDP over gloo)")


def gpu_only_launches(path: Path, recipe: Recipe, stages: list[str]) -> list[Problem]:
    """What `stages` ask for that runs only on GPUs, on a machine without CUDA (`alignkit run` refuses it, exit 2):
    FSDP, from an accelerate config's `distributed_type: FSDP` or the trainer's `args.fsdp`. Each problem names
    the recipe key and its line in `path` (the recipe file `recipe` was loaded from)."""
    import torch
    import yaml

    if torch.cuda.is_available():
        return []
    _, lines = parse_recipe(path)
    problems = []
    for name in stages:
        st = recipe.stages[name]
        key = ("stages", name, "launch") if st.launch else ("launch",)
        config = recipe.stage_launch(name).accelerate_config
        if config and (yaml.safe_load(Path(config).read_text()) or {}).get("distributed_type") == "FSDP":
            problems.append(Problem(key + ("accelerate_config",), f"{config} has distributed_type FSDP. {FSDP_NEEDS_GPUS}"))
        if st.args.get("fsdp"):
            problems.append(Problem(("stages", name, "args", "fsdp"), f"fsdp: {st.args['fsdp']!r}. {FSDP_NEEDS_GPUS}"))
    unique = list({(p.path, p.message): p for p in problems}.values())  # stages sharing the recipe's launch
    for p in unique:
        p.line = line_for(lines, p.path)
    return unique


# Sections of an accelerate config whose keys are `accelerate launch` options (accelerate merges them in by name).
_LAUNCH_OPTION_SECTIONS = ("fsdp_config", "deepspeed_config")


def check_accelerate_config(path: Path) -> list[str]:
    """Problems of an accelerate config file, each naming `path:line`: missing, not YAML, not a mapping, a key
    accelerate's `ClusterConfig` does not have, a `fsdp_config` / `deepspeed_config` key that is no
    `accelerate launch` option, a value accelerate refuses (e.g. an unknown `distributed_type`). Parsed as
    `accelerate launch --config_file` parses it; DeepSpeed itself need not be installed."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    if not path.is_file():
        return [f"accelerate config file {path} does not exist (e.g. recipes/accelerate/ddp.yaml)"]
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return [f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML: {getattr(e, 'problem', e)}"]
    if not isinstance(root, yaml.MappingNode):
        return [f"{path}:1: an accelerate config is a mapping of keys (compute_environment, distributed_type, ...)"]
    fields = set(ClusterConfig.__dataclass_fields__)
    options = {a.dest for a in launch_command_parser()._actions}
    problems = []
    for key, value in root.value:
        if key.value not in fields:
            problems.append(f"{path}:{key.start_mark.line + 1}: unknown accelerate config key '{key.value}'"
                            f"{did_you_mean(key.value, fields)}")
        elif key.value in _LAUNCH_OPTION_SECTIONS and isinstance(value, yaml.MappingNode):
            problems += [f"{path}:{k.start_mark.line + 1}: unknown {key.value} key '{k.value}'{did_you_mean(k.value, options)}"
                         for k, _ in value.value if k.value not in options]
    if problems:
        return problems
    try:
        ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError) as e:  # accelerate's own checks: enum values, argument types
        return [f"{path}: accelerate refuses this config: {e}"]
    return []


def check_recipe(recipe: Recipe, *, check_args: bool = True) -> list[Problem]:
    """Cross-field rules: stage references, cycles, data names, methods, TRL args, reward and eval names."""
    load_stages()
    problems: list[Problem] = []
    stages = recipe.stages
    for name, st in stages.items():
        where = ("stages", name)
        if st.method not in STAGES:
            problems.append(Problem(where + ("method",), f"unknown method '{st.method}'{did_you_mean(st.method, STAGES.names())}; known: {', '.join(STAGES.names())}"))
        if st.from_ != BASE and st.from_ not in stages:
            problems.append(Problem(where + ("from",), f"'{st.from_}' is not a stage of this recipe{did_you_mean(st.from_, list(stages) + [BASE])}; stages: {', '.join([BASE] + list(stages))}"))
        for i, ref in enumerate(st.data):
            if ref.name not in recipe.data:
                problems.append(Problem(where + ("data", i), f"dataset '{ref.name}' is not defined under data:{did_you_mean(ref.name, recipe.data)}; defined: {', '.join(recipe.data) or 'none'}"))
        for i, r in enumerate(st.rewards):
            dep = (r.model_extra or {}).get("stage")
            if r.name == "reward_model" and dep not in stages:
                problems.append(Problem(where + ("rewards", i, "stage"), f"reward_model needs `stage:` naming a reward stage of this recipe (got {dep!r})"))
            judge = (r.model_extra or {}).get("model")
            if r.name == "judge" and isinstance(judge, str) and not is_model_source(judge, stages):
                problems.append(Problem(where + ("rewards", i, "model"), f"judge model {judge!r} is neither a stage of this recipe{did_you_mean(judge, list(stages) + [BASE])}, a model folder nor an http:// URL"))
        if st.teacher is not None and st.method != "distill":
            problems.append(Problem(where + ("teacher",), f"only method distill reads `teacher:` (this stage is {st.method}); remove it"))
        if st.method in STAGES:
            method = STAGES.get(st.method)
            if check_args and method.config_class is not None:
                found = _check_args(method.config_class(), st.args, where + ("args",))
                problems += found or _build_config(recipe, name, method.config_class(), where + ("args",))
            problems += method.check(recipe, name) if method.check else []
    if not problems:
        try:
            recipe.order()
        except graphlib.CycleError as e:
            cycle = " -> ".join(e.args[1])
            problems.append(Problem(("stages", e.args[1][0]), f"stages form a cycle: {cycle}"))
    known = set(stages) | {BASE}
    for i, ev in enumerate(recipe.evals):
        for j, s in enumerate(ev.stages or []):
            if s not in known:
                problems.append(Problem(("evals", i, "stages", j), f"'{s}' is not a stage{did_you_mean(s, known)}"))
        if ev.data is not None and ev.data not in recipe.data:
            problems.append(Problem(("evals", i, "data"), f"dataset '{ev.data}' is not defined under data:{did_you_mean(ev.data, recipe.data)}"))
    problems += _check_plugins(recipe)
    problems += [Problem(("report_to",), f"report_to: {m}") for m in missing_packages(recipe.report_to)]
    for name, st in stages.items():
        problems += [Problem(("stages", name, "report_to"), f"report_to: {m}") for m in missing_packages(st.report_to or [])]
    return problems


def is_model_source(name: str, stages) -> bool:
    """A judge's `model:` can be read: a stage of the recipe, base, a bundled model, a folder, or an http(s) URL
    (loopback is checked by the reward itself)."""
    return name in stages or name == BASE or Path(name).is_dir() or name.startswith(("bundled:", "http://", "https://"))


def _check_args(config_class, args: dict, path: tuple) -> list[Problem]:
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    problems = []
    for key in args:
        if key in RESERVED_ARGS:
            problems.append(Problem(path + (key,), f"'{key}' is set by alignkit (the run directory); remove it"))
        elif key not in fields:
            problems.append(Problem(path + (key,), f"unknown {config_class.__name__} argument '{key}'{did_you_mean(key, fields)}"))
    return problems


SCALARS = (int, float, bool)

# Config fields without `choices` metadata whose value TRL 1.16 checks only inside the loss, at the first training
# step ("Unknown loss type"): the values its trainers take, as that error and the field's help list them.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("DPOConfig", "loss_type"): ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                 "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    ("GRPOConfig", "loss_type"): ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
}
# Trainer arguments of a generating method (grpo, rloo, online_dpo) that its `rollout:` section sets (`rollout:` key):
# set under `args` too, the trainer would score or size the samples with one value while alignkit's engine draws
# them with another (e.g. log-probs at temperature 0.3 of completions sampled at 1.0).
ROLLOUT_OWNED = {"num_generations": "num_generations", "max_completion_length": "max_new_tokens",
                 "max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}
# ... and TRL's own generation settings, which alignkit's engine (`rollout:`) replaces.
TRL_GENERATION = ("use_vllm", "generation_kwargs", "use_transformers_paged", "cache_implementation", "min_p",
                  "repetition_penalty")

# TrainingArguments that need an eval set: alignkit hands its trainers none (held-out evals are the recipe's
# `evals:`, run after the stage), so transformers' Trainer refuses them at construction, after the model loaded.
NEEDS_EVAL_SET: dict[str, Callable[[Any], bool]] = {
    "eval_strategy": lambda v: v not in (None, "no"),
    "save_strategy": lambda v: v == "best",
    "load_best_model_at_end": bool,
    "metric_for_best_model": lambda v: v is not None,
}


def _generation_problems(args: dict, path: tuple) -> list[Problem]:
    """A generating stage's `args` that `rollout:` owns (`ROLLOUT_OWNED`) or that are TRL's own generation
    settings (`TRL_GENERATION`, `vllm_*`): alignkit's engine samples with `rollout:` alone."""
    problems = []
    for key in args:
        if key in ROLLOUT_OWNED:
            problems.append(Problem(path + (key,), f"set it under the stage's `rollout:` as `{ROLLOUT_OWNED[key]}:` "
                                                   f"-- the engine samples with rollout's value, and the trainer would "
                                                   f"use another"))
        elif key in TRL_GENERATION or key.startswith("vllm_"):
            problems.append(Problem(path + (key,), f"TRL's own generation setting; alignkit generates through the "
                                                   f"stage's `rollout:` (backend, temperature, top_p, top_k, "
                                                   f"max_new_tokens, ...): remove it"))
    return problems


def _choice_problems(config_class, args: dict, path: tuple) -> list[Problem]:
    """Values outside a field's choices (its `choices` metadata, or `CHOICES`), and arguments that need an eval
    set (`NEEDS_EVAL_SET`): what the trainer would refuse only once the model has loaded, or mid-training."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for key, value in args.items():
        if key in NEEDS_EVAL_SET and NEEDS_EVAL_SET[key](value):
            problems.append(Problem(path + (key,), f"{key}: {value!r} needs an eval set during training, and alignkit "
                                                   f"trains without one (held-out evals are the recipe's `evals:`, run "
                                                   f"after each stage); remove it"))
            continue
        choices = CHOICES.get((config_class.__name__, key)) or (fields[key].metadata.get("choices") if key in fields else None)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if choices and isinstance(v, str) and v not in choices]
        if bad:
            problems.append(Problem(path + (key,), f"unknown {config_class.__name__}.{key} {bad[0]!r}"
                                                   f"{did_you_mean(bad[0], list(choices))}; one of: {', '.join(choices)}"))
    return problems


def _scalar_type(hint):
    """`int`, `float`, `bool`, `int | float` (None allowed) -> a pydantic-checkable type; else (e.g. `list[float]`,
    which TRL's OnlineDPOConfig.beta also takes as a float) None: not checked."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return hint if args and all(a in SCALARS for a in args) else None


def _list_type(hint):
    """The `list[X]` (X a scalar) that `hint` is or has among its union members (DPOConfig.loss_weights:
    `list[float] | None`), for checking a list value; else None."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for member in typing.get_args(hint) if union else [hint]:
        if typing.get_origin(member) is list and all(a in SCALARS for a in typing.get_args(member)):
            return member
    return None


def _build_config(recipe: Recipe, name: str, config_class, path: tuple) -> list[Problem]:
    """A TRL stage's `args` as its trainer will take them: each number-, int- or bool-typed value (or list of them) checked and
    converted in pydantic's lax mode (YAML 1.1 reads `1e-3` as a string: it becomes the number the user meant,
    written back into the recipe), then the config object built as `StageContext.trl_config` builds it, so its own
    checks (batch geometry, generation counts, incompatible flags) fail here with the recipe's key and line."""
    import pydantic
    import transformers

    from alignment.stages import trainer_kwargs

    if not issubclass(config_class, transformers.TrainingArguments):
        return []  # e.g. PPOConfig: a pydantic dataclass checked by its stage's own `check`
    args, problems = recipe.stages[name].args, []
    hints = typing.get_type_hints(config_class)
    for key, value in args.items():
        kind = _scalar_type(hints.get(key)) or (_list_type(hints.get(key)) if isinstance(value, list) else None)
        if kind is None or (key, value) == ("bf16", "auto"):  # `effective_args` resolves bf16: auto
            continue
        try:
            converted = pydantic.TypeAdapter(kind).validate_python(value)
        except pydantic.ValidationError as err:
            problems.append(Problem(path + (key,), f"{err.errors()[0]['msg'].lower()} for {config_class.__name__}.{key} (got {value!r})"))
            continue
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value)):
            args[key] = converted
    problems += _choice_problems(config_class, args, path)
    if STAGES.get(recipe.stages[name].method).generates:
        problems += _generation_problems(args, path)
    if problems:
        return problems
    try:
        config = config_class(**trainer_kwargs(recipe, name, Path("unused")))
    except Exception as err:  # the trainer's own refusal, in its words
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        named = [k for k in args if re.search(rf"\b{re.escape(k)}\b", message)]
        return [Problem(path + ((named[0],) if named else ()), f"{config_class.__name__} refuses these args: {message}")]
    adapter = recipe.stage_model(name).adapter is not None
    return [Problem(path + (rule.key,), f"{config_class.__name__}: {rule.message}") for rule in TRAINER_RULES
            if config_class.__name__ in rule.configs and rule.refuses(config, adapter)]


@dataclasses.dataclass(frozen=True)
class TrainerRule:
    """A check TRL 1.16's trainer makes in its constructor -- after the model has loaded -- on its config and on
    whether the model has an adapter alone, so `validate` makes it first."""

    configs: tuple[str, ...]  # config class names it applies to
    key: str  # the argument the problem is placed at
    refuses: Callable[[Any, bool], bool]  # (config, adapter?) -> refused
    message: str


def _loss_types(config) -> list[str]:
    return config.loss_type if isinstance(config.loss_type, list) else [config.loss_type]


F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
TRAINER_RULES = (
    TrainerRule(("DPOConfig", "KTOConfig", "GRPOConfig", "RLOOConfig"), "sync_ref_model",
                lambda c, adapter: c.sync_ref_model and adapter,
                "sync_ref_model needs a reference model of its own, and with an adapter the reference is the model "
                "with the adapter disabled; remove sync_ref_model or the adapter"),
    TrainerRule(("DPOConfig", "KTOConfig"), "sync_ref_model",
                lambda c, adapter: c.sync_ref_model and c.precompute_ref_log_probs,
                "sync_ref_model updates the reference, so its log-probs cannot be precomputed; remove one of "
                "sync_ref_model and precompute_ref_log_probs"),
    TrainerRule(("GRPOConfig", "RLOOConfig"), "sync_ref_model", lambda c, adapter: c.sync_ref_model and c.beta == 0,
                "sync_ref_model with beta 0: there is no reference model to sync; remove it or set beta > 0"),
    TrainerRule(("DPOConfig",), "loss_type",
                lambda c, adapter: "exo_pair" in _loss_types(c) and c.label_smoothing == 0,
                "loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)"),
    TrainerRule(("DPOConfig",), "f_divergence_type",
                lambda c, adapter: c.f_divergence_type != "reverse_kl" and not set(_loss_types(c)) <= F_DIVERGENCE_LOSSES,
                f"an f_divergence_type other than reverse_kl works only with loss_type "
                f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}"),
    TrainerRule(("DPOConfig",), "use_weighting",
                lambda c, adapter: c.use_weighting and bool({"aot", "aot_unpaired"} & set(_loss_types(c))),
                "use_weighting is not implemented for loss_type aot / aot_unpaired"),
    TrainerRule(("KTOConfig",), "per_device_train_batch_size",
                lambda c, adapter: c.loss_type == "kto" and c.per_device_train_batch_size <= 1,
                "loss_type kto needs per_device_train_batch_size > 1 (its KL term pairs each row with another "
                "of its batch)"),
    TrainerRule(("KTOConfig",), "train_sampling_strategy",
                lambda c, adapter: c.loss_type == "kto" and c.train_sampling_strategy != "sequential",
                "loss_type kto needs train_sampling_strategy sequential (its KL term pairs each row with its "
                "neighbour in a fixed-order batch)"),
)


def _check_plugins(recipe: Recipe) -> list[Problem]:
    """Reward names and parameters bind; eval tasks exist and take their args."""
    problems = []
    for name, st in recipe.stages.items():
        for i, r in enumerate(st.rewards):
            spec = {"name": r.name, "weight": r.weight, **(r.model_extra or {})}
            try:
                build_reward(spec)
            except (KeyError, ValueError, TypeError, ImportError) as e:
                msg = e.args[0] if e.args else str(e)
                problems.append(Problem(("stages", name, "rewards", i, "name"), str(msg)))
    for i, ev in enumerate(recipe.evals):
        if ev.task not in TASKS:
            problems.append(Problem(("evals", i, "task"), f"unknown eval task '{ev.task}'{did_you_mean(ev.task, TASKS.names())}; known: {', '.join(TASKS.names())}"))
        else:
            problems += [Problem(("evals", i, "args"), msg) for msg in check_task_args(ev.task, ev.args, has_data=ev.data is not None)]
    return problems


# ---------------------------------------------------------------- data and model, before any model loads

# Files one of which a tokenizer folder holds (fast tokenizers, sentencepiece, BPE and WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
CHAT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")  # columns that may hold a conversation


def check_inputs(recipe: Recipe, path: str | Path, *, offline: bool = False):
    """What `validate` (and `run`, before any stage starts) checks beyond the recipe file, reading files only:
    every dataset a stage uses row by row against the stage's formats (`on_bad_rows`), the columns its rewards
    and evals read, the model folder (config and tokenizer files, or the hub when offline), a chat template
    for conversational data, and the rows a stage's `max_length` cuts or leaves out (with the tokenizer, no model).

    Returns:
        The `alignment.data.DataReport` of rows dropped, retyped, split or truncated.

    Raises:
        RecipeError: model or data that does not fit the recipe, with file:line and key.
        DataError: a dataset that cannot be used, with its file:line.
    """
    from alignment.data import DataError, DataReport, check, is_hub, load

    problems, report, seen, loaded = [], DataReport(), set(), {}
    folder, model_problems = model_folder(recipe.model.name_or_path, revision=recipe.model.revision, offline=offline)
    problems += model_problems
    for name, st in recipe.stages.items():
        fn = STAGES.get(st.method)
        if fn.formats and not st.data:
            problems.append(Problem(("stages", name, "data"), f"stage '{name}' ({st.method}) has no data: add "
                                    f"`data: [NAME]` naming a dataset under data: (formats: {', '.join(fn.formats)})"))
        for i, ref in enumerate(st.data):
            if offline and is_hub(recipe.data[ref.name]):
                continue  # `--offline`: hub datasets are named by the CLI, not loaded
            into = DataReport() if ref.name in seen else report  # a dataset two stages use is reported once
            seen.add(ref.name)
            try:
                data = loaded[ref.name] = load(ref.name, recipe.data[ref.name], on_bad_rows=recipe.on_bad_rows, report=into)
            except DataError as err:
                if Path(recipe.data[ref.name].path).exists():
                    raise  # the file's own error names its line
                problems.append(Problem(("data", ref.name, "path"), str(err)))  # not found: the recipe's line
                continue
            check(data, fn.formats, on_bad_rows=recipe.on_bad_rows, report=into)
            for r in st.rewards:  # a `column:` (math_accuracy's gold) or TRL-style `fn(prompts, completions, answer, **kw)`
                absent = [c for c in build_reward(r.model_dump()).reads if c not in data.rows[0]]
                if absent:
                    raise DataError(f"{data.where(0)}: reward '{r.name}' of stage '{name}' reads column(s) {absent}, "
                                    f"which dataset '{ref.name}' does not have (columns: {sorted(data.rows[0])})")
            if folder and _conversational(data.rows) and not _has_chat_template(folder):
                problems.append(Problem(("stages", name, "data", i), (
                    f"dataset '{ref.name}' is conversational ({data.where(0)}) but the tokenizer of "
                    f"{recipe.model.name_or_path} has no chat template; use a model with one (an instruct/chat "
                    f"checkpoint), add `chat_template` to its tokenizer_config.json, or give `text` / plain-string "
                    f"prompt and completion rows")))
    problems += _check_eval_data(recipe, loaded, offline=offline)
    if not problems and folder:
        problems += _check_lengths(recipe, folder, report)
    if problems:
        _, lines = parse_recipe(path)
        for p in problems:
            p.line = p.line or line_for(lines, p.path)
        raise RecipeError(str(path), problems)
    return report


def model_folder(name_or_path: str, *, revision: Optional[str] = None,
                 offline: bool = False) -> tuple[Optional[Path], list[Problem]]:
    """The local folder of the recipe's model without loading it -- a local folder, a converted bundled model or
    the hub cache -- or None where it can only be known by downloading; with the problems found: a path that is
    not a folder, a model the hub cache lacks while offline (`HF_HUB_OFFLINE`) or the hub cannot be reached, a
    folder without config.json or without tokenizer files. `offline` (`validate --offline`): a hub id the cache
    lacks is taken as given."""
    from huggingface_hub import constants, try_to_load_from_cache

    key = ("model", "name_or_path")
    if name_or_path.startswith("bundled:"):
        from alignment.models import cache_dir

        cached = cache_dir() / "bundled" / name_or_path.split(":", 1)[1]
        return (cached if (cached / "config.json").exists() else None), []  # converted on first use
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") > 1:
            return None, [Problem(key, f"'{name_or_path}' is not a local model folder (relative paths are relative to "
                                       f"the recipe's folder)")]
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        if isinstance(cached, str):
            path = Path(cached).parent
        elif offline:  # `validate --offline`: a hub model is named, not looked up
            return None, []
        elif constants.is_offline_mode():
            return None, [Problem(key, f"'{name_or_path}' is not a local folder, and the hub is not reachable "
                                       f"(HF_HUB_OFFLINE is set) and has not cached it; give a local model folder "
                                       f"(relative to the recipe's folder), or unset HF_HUB_OFFLINE to download it")]
        else:
            return None, _hub_problems(name_or_path, revision, key)
    if not (path / "config.json").exists():
        return None, [Problem(key, f"{path} has no config.json: not a model folder")]
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None, [Problem(key, f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                                   f"tokenizer of the model it was made from into the folder")]
    return path, []


HUB_TIMEOUT_S = 10.0  # a hub lookup at validate time; a model download later uses the hub's own timeouts


def _hub_problems(repo: str, revision: Optional[str], key: tuple) -> list[Problem]:
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from alignment import hub

    why = hub.unreachable()
    if why:
        return [Problem(key, f"'{repo}' is not a local folder, and {hub.note(why)}")]
    try:
        model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return [Problem(key, f"'{repo}' is not a local folder, and the hub has no such model{f' at revision {revision}' if revision else ''}")]
    except Exception as err:  # connection errors come in many types (requests, httpx, OSError)
        return [Problem(key, f"'{repo}' is not a local folder, and the hub is not reachable ({type(err).__name__}); "
                             f"give a local model folder, or set HF_HUB_OFFLINE=1 to use the hub cache")]
    return []


def _conversational(rows: list[dict]) -> bool:
    return any(isinstance(row.get(c), list) for row in rows for c in CHAT_COLUMNS)


def _has_chat_template(folder: Path) -> bool:
    """A chat template in the tokenizer folder: `chat_template` in tokenizer_config.json or a template file."""
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(config.get("chat_template"))


def _check_eval_data(recipe: Recipe, loaded: dict, *, offline: bool = False) -> list[Problem]:
    """Each eval's dataset loads and has the rows and columns its task reads (`evals.check_task_data`);
    `offline`: hub datasets are not loaded."""
    from alignment.data import DataError, is_hub, load

    problems = []
    for i, ev in enumerate(recipe.evals):
        if ev.data is None or ev.task not in TASKS or ev.data not in recipe.data:
            continue
        if offline and is_hub(recipe.data[ev.data]):
            continue
        try:
            data = loaded.get(ev.data) or load(ev.data, recipe.data[ev.data])
        except DataError as err:
            problems.append(Problem(("evals", i, "data"), str(err)))
            continue
        problems += [Problem(("evals", i, "data"), f"{msg} ({data.where(0)})")
                     for msg in check_task_data(ev.task, ev.args, data.rows[0])]
    return problems


def _check_lengths(recipe: Recipe, folder: Path, report) -> list[Problem]:
    """Rows the `max_length` of each stage whose trainer cuts or leaves out long rows (its method's `long_rows`)
    affects -- the recipe's value, else the config's default -- counted with the tokenizer alone
    (`count_truncated`); what it refuses (no row keeps its completion; any row affected under `on_bad_rows: error`)
    is a problem of the stage's `args.max_length`."""
    from alignment.data import DataError, count_truncated
    from alignment.models import keep_tokenizer, load_tokenizer
    from alignment.stages import effective_args

    tokenizer, problems = None, []
    for name, st in recipe.stages.items():
        fn = STAGES.get(st.method)
        if not fn.long_rows:
            continue
        default = {f.name: f.default for f in dataclasses.fields(fn.config_class())}.get("max_length")
        max_length = effective_args(recipe, name).get("max_length", default)
        if max_length is None:
            continue
        tokenizer = tokenizer or load_tokenizer(str(folder), trust_remote_code=recipe.model.trust_remote_code)
        try:
            count_truncated(tokenizer, max_length, recipe.data, st.data, fn.formats, on_bad_rows=recipe.on_bad_rows,
                            report=report, long_rows=fn.long_rows)
        except DataError as err:
            problems.append(Problem(("stages", name, "args", "max_length"), str(err)))
    if tokenizer is not None and not problems:  # for the stage `alignkit run` starts in this process (spans counted included)
        keep_tokenizer(tokenizer, str(folder), trust_remote_code=recipe.model.trust_remote_code)
    return problems
