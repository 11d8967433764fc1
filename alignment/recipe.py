"""The recipe: one YAML file describing a whole post-training pipeline.

Strict pydantic models (`extra="forbid"`), one per section. YAML is loaded with line numbers so that
every error names the file, the line, the key path and, for a misspelt key, the closest valid name.
All problems are collected and raised once as a `RecipeError` (the CLI exits with code 2).

This module is the schema alone: it imports no stage, reward or eval registry. `alignment.validate.load_recipe`
loads a recipe for use (schema + cross-registry checks + registered defaults + absolute paths).
"""
from __future__ import annotations

import dataclasses
import graphlib
import re
from pathlib import Path
from typing import Annotated, Any, Container, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignment.registry import closest, did_you_mean

BASE = "base"  # the name of the starting model in `from:` and in eval stage lists

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Backend = Literal["auto", "hf", "vllm", "vllm-server"]  # rollout engines (alignment/rollout.py make_engine)
Tracker = Literal["tensorboard", "trackio", "wandb", "mlflow"]  # experiment trackers (alignment/tracking.py TRACKERS)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a run, stage or data set name: a folder / file name, nothing more


def _name(value: str) -> str:
    """A stage or data set name becomes a folder or file of the run directory and a word of the report: letters,
    digits, `_`, `.`, `-`, starting with a letter or digit (no `/`, `..`, spaces or markup)."""
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError("a stage or data set name is letters, digits, '_', '.', '-', starting with a letter or digit "
                         "(it names a folder of the run directory)")
    return value


Name = Annotated[str, AfterValidator(_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class QuantizationConfig(Strict):
    """bitsandbytes quantization of the frozen base weights (QLoRA when an adapter is added)."""

    bits: Literal[4, 8] = Field(4, description="4-bit (nf4/fp4) or 8-bit (LLM.int8) weights")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; ignored for 8-bit")
    double_quant: bool = Field(True, description="quantize the quantization constants too (saves ~0.4 bit/param)")
    compute_dtype: Optional[Dtype] = Field(None, description="matmul dtype; default: the model dtype")


class AdapterConfig(Strict):
    """A peft adapter trained on top of frozen base weights."""

    method: Literal["lora", "dora", "rslora"] = Field("lora", description="LoRA, weight-decomposed LoRA, or rank-stabilised LoRA")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scaling numerator (scale = alpha / r, or alpha / sqrt(r) for rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: Union[str, list[str]] = Field("all-linear", description="'all-linear' or module names")
    modules_to_save: Optional[list[str]] = Field(None, description="extra modules trained in full (e.g. a new head)")


class ModelConfig(Strict):
    name_or_path: str = Field(..., description="hub id, local folder, or bundled:NAME")
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Dtype = Field("auto", description="auto = bfloat16 on a GPU that supports it, else float32")
    attn_implementation: Optional[str] = Field(None, description="eager | sdpa | flash_attention_2; default: transformers' choice")
    quantization: Optional[QuantizationConfig] = Field(None, description="bitsandbytes quantization of the base weights")
    adapter: Optional[AdapterConfig] = Field(None, description="train a peft adapter instead of all weights")
    trust_remote_code: bool = Field(False, description="allow model code from the hub")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")


class ModelOverride(Strict):
    """Per-stage override of parts of `model` (e.g. a QLoRA stage beside a LoRA one)."""

    dtype: Optional[Dtype] = None
    attn_implementation: Optional[str] = None
    quantization: Optional[QuantizationConfig] = None
    adapter: Optional[AdapterConfig] = None
    gradient_checkpointing: Optional[bool] = None


class DatasetConfig(Strict):
    path: str = Field(..., description="local .jsonl/.json/.parquet/.csv file (relative to the recipe) or a hub dataset id")
    split: str = Field("train", description="split of a hub dataset")
    subset: Optional[str] = Field(None, description="configuration name of a hub dataset")
    revision: Optional[str] = Field(None, description="hub revision")
    columns: dict[str, str] = Field(default_factory=dict, description="rename columns {from: to} after loading")
    max_rows: Optional[int] = Field(None, gt=0, description="keep only the first N rows")
    unpaired: bool = Field(False, description="turn chosen/rejected pairs into unpaired rows (prompt, completion, label) for KTO")
    system_prompt: Optional[str] = Field(None, description=(
        "a system message put first in every conversation of the dataset that has none (the `messages`, the "
        "`prompt`, or chosen and rejected when there is no prompt); a chat template's own default system prompt "
        "is then left out. Rows must be conversations. Give the training and the eval sets the same one"))


class DataRef(Strict):
    name: str
    weight: float = Field(1.0, gt=0, description="share of the mixture, relative to the other datasets")


class RewardSpec(BaseModel):
    """`{name: math_accuracy, weight: 1.0, <params>...}`: params bind to the reward function's keywords."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0


class RolloutConfig(Strict):
    backend: Backend = Field("auto", description="auto = vllm where it imports, else hf")
    num_generations: int = Field(4, gt=0, description="completions per prompt")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    url: Optional[str] = Field(None, description="vllm-server: use this running server instead of starting one")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM's share of GPU memory")
    max_model_len: int = Field(1024, gt=0)
    enforce_eager: Optional[bool] = Field(None, description=(
        "vLLM's enforce_eager: unset = eager on CPU (compiling costs 1-2 min at start), compiled on GPU; false "
        "compiles on CPU too, for runs that decode for minutes (bench/README.md: 2.66x HF's tok/s at batch 64)"))


class LaunchConfig(Strict):
    """How a stage's processes start (alignment.pipeline.Pipeline.command): one plain process when neither key is
    set; else `accelerate launch` with the config file, or on CUDA; else (CPU) `torch.distributed.run` over gloo."""

    accelerate_config: Optional[str] = Field(None, description=(
        "accelerate config file (relative to the recipe), e.g. recipes/accelerate/zero3.yaml: DDP, FSDP2 or "
        "DeepSpeed ZeRO; its num_processes counts all machines' processes"))
    num_processes: Optional[int] = Field(None, gt=0, description=(
        "processes per machine (one per GPU; on CPU, gloo ranks); overrides the config file's count. "
        "The global batch is per_device_train_batch_size x processes x machines x gradient_accumulation_steps"))
    extra_args: list[str] = Field(default_factory=list, description=(
        "more arguments for the launcher used (`accelerate launch`, or `torch.distributed.run` on CPU)"))


def _listed(value):
    """`report_to: tensorboard` means `[tensorboard]`."""
    return [value] if isinstance(value, str) else value


class StageConfig(Strict):
    method: str = Field(..., description="sft | reward | dpo | kto | grpo | ppo")
    from_: str = Field(BASE, alias="from", description="start from this stage's model (or base)")
    data: list[DataRef] = Field(default_factory=list, description="dataset names, or a weighted mixture")
    args: dict[str, Any] = Field(default_factory=dict, description="passed to the method's TRL config (SFTConfig, DPOConfig, ...)")
    model: Optional[ModelOverride] = Field(None, description="override parts of the recipe's model for this stage")
    rewards: list[RewardSpec] = Field(default_factory=list, description="reward functions (grpo, ppo)")
    max_missing_reward_steps: int = Field(3, ge=1, description=(
        "grpo, ppo: stop the stage (exit 2, naming the rewards and the step) after this many steps in a row in "
        "which every reward lost every score (NaN, inf, not a number, raised): such a step trains on nothing"))
    rollout: Optional[RolloutConfig] = Field(None, description="generation settings (grpo, ppo)")
    launch: Optional[LaunchConfig] = Field(None, description="override the recipe's launch for this stage")
    teacher: Optional[str] = Field(None, description=(
        "distill: the teacher model -- an earlier stage, base, a local folder or a hub id; it may differ in size "
        "but must share the student's tokenizer"))
    report_to: Optional[list[Tracker]] = Field(None, description="override the recipe's report_to for this stage ([]: none)")
    _one_tracker = field_validator("report_to", mode="before")(_listed)

    @field_validator("data", mode="before")
    @classmethod
    def _names_to_refs(cls, value):
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            return value  # pydantic refuses it, with its line
        return [{"name": v} if isinstance(v, str) else v for v in value]


class EvalConfig(Strict):
    task: str = Field(..., description="a registered eval task (alignkit list)")
    data: Optional[str] = Field(None, description="dataset name")
    stages: Optional[list[str]] = Field(None, description="stages to evaluate (and base); default: base and all")
    args: dict[str, Any] = Field(default_factory=dict, description="task parameters")


class DecontaminateConfig(Strict):
    """Training rows that share a word n-gram with an eval set (alignment/decontam.py)."""

    ngram: int = Field(13, gt=0, description="n of the word n-grams compared (13: GPT-3's contamination study)")
    action: Literal["drop", "warn"] = Field("warn", description="drop: leave the rows out of training; warn: keep them, say so")


class RewardHackingConfig(Strict):
    """When the run summary and the report warn of reward hacking in an RL stage (evals/alarm.py)."""

    reward_rise_se: float = Field(2.0, gt=0, description=(
        "the training reward counts as risen when its last-quarter mean beats its first-quarter mean by this many "
        "standard errors"))
    eval_gain_se: float = Field(1.0, ge=0, description=(
        "a held-out eval counts as improved on the stage's `from` when it gains this many standard errors"))
    kl_budget: Optional[float] = Field(None, gt=0, description=(
        "KL(policy || reference) in nats per sequence (kl/ref) that an RL stage's last quarter of steps may reach; "
        "null: no budget"))


class Recipe(Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="run directory name")
    seed: int = 42
    model: ModelConfig
    data: dict[Name, DatasetConfig] = Field(default_factory=dict)
    stages: dict[Name, StageConfig]
    evals: list[EvalConfig] = Field(default_factory=list)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    decontaminate: Optional[DecontaminateConfig] = Field(None, description=(
        "drop or warn about training rows that share an n-gram with an eval set; null: validate and plan only "
        "report the overlap"))
    reward_hacking: RewardHackingConfig = Field(default_factory=RewardHackingConfig)
    report_to: list[Tracker] = Field(default_factory=list, description=(
        "experiment trackers every stage and the evals log to, besides metrics.jsonl (alignment/tracking.py); "
        "wandb runs offline unless WANDB_MODE says otherwise"))
    on_bad_rows: Optional[Literal["error", "drop", "warn"]] = Field(None, description=(
        "rows that are malformed (empty or null text, an unknown role, a conversation not ending with the "
        "assistant, ...) or whose completion the stage's max_length cuts off: error = stop, naming file:line; "
        "drop = leave them out; warn = keep the truncated rows and leave out the malformed ones (they cannot "
        "train). Every such row is counted and reported per dataset. null: error for malformed rows, warn for "
        "truncated ones"))

    _one_tracker = field_validator("report_to", mode="before")(_listed)

    @model_validator(mode="after")
    def _stage_names(self):
        if BASE in self.stages:
            raise ValueError(f"'{BASE}' is reserved for the starting model; rename that stage")
        return self

    def stage_model(self, stage: str) -> ModelConfig:
        """The recipe's model with the stage's overrides applied (only keys the stage sets)."""
        override = self.stages[stage].model
        if override is None:
            return self.model
        return self.model.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})

    def stage_report_to(self, stage: str) -> list[str]:
        """The trackers the stage logs to: its own `report_to`, else the recipe's."""
        own = self.stages[stage].report_to
        return list(self.report_to if own is None else own)

    def stage_launch(self, stage: str) -> LaunchConfig:
        return self.stages[stage].launch or self.launch

    def order(self) -> list[str]:
        """Stages in dependency order (`from:` and reward-model stages first)."""
        graph = {name: stage_dependencies(st, self.stages) for name, st in self.stages.items()}
        return list(graphlib.TopologicalSorter(graph).static_order())

    def ancestors(self, stage: str) -> list[str]:
        """The stages `stage` needs, in order, ending with `stage` itself."""
        needed, todo = set(), [stage]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(stage_dependencies(self.stages[name], self.stages))
        return [s for s in self.order() if s in needed]


def stage_dependencies(stage: StageConfig, stages: Container[str] = ()) -> list[str]:
    """The stages `stage` needs: its `from`, reward models, and -- when they name one of `stages` (the recipe's)
    rather than a folder -- its `teacher` and a judge's `model`."""
    deps = [] if stage.from_ == BASE else [stage.from_]
    deps += [r.model_extra["stage"] for r in stage.rewards if r.name == "reward_model" and "stage" in (r.model_extra or {})]
    named = [stage.teacher] + [(r.model_extra or {}).get("model") for r in stage.rewards if r.name == "judge"]
    return deps + [n for n in named if n in stages]


# ---------------------------------------------------------------- errors with file:line


@dataclasses.dataclass
class Problem:
    path: tuple
    message: str
    line: Optional[int] = None


class RecipeError(Exception):
    """One or more problems in a recipe; str() lists them all, each with file:line."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} problem(s) in recipe {self.file}:" if len(self.problems) > 1 else f"invalid recipe {self.file}:"]
        for p in self.problems:
            where = f"{self.file}:{p.line}" if p.line else self.file
            key = ".".join(str(x) for x in p.path)
            lines.append(f"  {where}: {key + ': ' if key else ''}{p.message}")
        return "\n".join(lines)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override is a classic recipe bug)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_map(node, path=(), out=None) -> dict[tuple, int]:
    """Path tuple -> 1-based line of the key (mappings) or item (sequences)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = path + (key_node.value,)
            out[sub] = key_node.start_mark.line + 1
            _line_map(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


def line_for(lines: dict[tuple, int], path: tuple) -> Optional[int]:
    """The line of `path`, or of its closest parent key that has one."""
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _is_model(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _field_name(cls, key) -> str:
    for name, field in cls.model_fields.items():
        if key in (name, field.alias):
            return name
    return str(key)


def _unwrap(annotation):
    """Optional[X] -> X; list[X] / dict[K, X] are kept for the caller to step into."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        models = [a for a in args if _is_model(a) or get_origin(a) in (list, dict)]
        return models[0] if models else args[0]
    return annotation


def _valid_keys(path: tuple) -> list[str]:
    """Valid key names at the level of `path`'s last part."""
    cls: Any = Recipe
    parts = list(path[:-1])
    while parts:
        part = parts.pop(0)
        if not _is_model(cls):
            return []
        field = cls.model_fields.get(_field_name(cls, part))
        if field is None:
            return []
        cls = _unwrap(field.annotation)
        while get_origin(cls) in (dict, list) and parts:
            parts.pop(0)  # the dict key or list index
            cls = _unwrap(get_args(cls)[-1])
    if not _is_model(cls):
        return []
    return [f.alias or n for n, f in cls.model_fields.items()]


def _pydantic_problems(err: ValidationError, lines) -> list[Problem]:
    """One Problem per error, except that a required key reported missing beside an unknown key that is its
    misspelling (`stagse:` for `stages:`) is one problem: the unknown key, with its line and the closest name."""
    errors = [(e, _error_path(e)) for e in err.errors()]
    misspelt = {path[:-1] + (closest(str(path[-1]), _valid_keys(path)),) for e, path in errors if e["type"] == "extra_forbidden"}
    problems = []
    for e, path in errors:
        if e["type"] == "extra_forbidden":
            key = path[-1]
            msg = f"unknown key '{key}'{did_you_mean(str(key), _valid_keys(path))}"
        elif e["type"] == "missing":
            if path in misspelt:
                continue
            msg = f"missing required key '{path[-1]}'"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        # a missing top-level key: the file's start; with no line map (a stage's args), the caller places it
        problems.append(Problem(path, msg, line_for(lines, path) or (1 if lines else None)))
    return problems


def _error_path(error: dict) -> tuple:
    """A pydantic error's `loc` without its validator and union-member parts: the recipe's key path."""
    return tuple(x for x in error["loc"] if not (isinstance(x, str) and x[:1].isupper() and "[" in x
                                                 or x in ("function-after", "function-before", "[key]")))


# ---------------------------------------------------------------- parsing


def parse_recipe(path: str | Path) -> tuple[Recipe, dict[tuple, int]]:
    """Read a recipe file and check it against the schema only (no registries, no data, paths as written).

    Returns the recipe and its line map (key path -> 1-based line) for later errors; `alignment.validate.load_recipe`
    adds the cross-registry checks. Raises RecipeError listing every schema problem, each with file:line.
    """
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(file, [Problem((), f"cannot read: {e.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        msg = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise RecipeError(file, [Problem((), f"bad YAML: {msg}", mark.line + 1 if mark else None)]) from None
    if not isinstance(raw, dict):
        raise RecipeError(file, [Problem((), "a recipe is a YAML mapping (name:, model:, stages:, ...)", 1)])
    lines = _line_map(node)
    try:
        return Recipe.model_validate(raw), lines
    except ValidationError as e:
        raise RecipeError(file, _pydantic_problems(e, lines)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (all defaults filled) as YAML, written into each run directory. A stage's `model:`
    override keeps only the keys it sets, so the stage process still inherits the rest from `model:`."""
    data = recipe.model_dump(mode="json", by_alias=True)
    for name, st in recipe.stages.items():
        if st.model is not None:
            data["stages"][name]["model"] = st.model.model_dump(mode="json", exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False)


def parse_resolved(text: str) -> Recipe:
    """Load a recipe written by dump_recipe (already validated and absolute)."""
    return Recipe.model_validate(yaml.safe_load(text))
