"""What an eval task is handed (`EvalContext`) and what it returns (`EvalResult`), and the shared
model work: generation (through the `alignment.rollout` engines: `Completion`s), per-token
log-probs, reward-model scores (through `alignment.models.RewardScorer`).

A task is `fn(ctx: EvalContext, **args) -> EvalResult`, registered with `@task("name")`; the
recipe's `evals[i].args` bind to its keywords, except the context keys (`CONTEXT_ARGS`) that pick
the generation engine. Heavy imports (torch, transformers) happen inside the functions that use them.
"""
from __future__ import annotations

import gc
import inspect
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, get_args

import pydantic

from alignment.recipe import Backend
from alignment.registry import Registry, did_you_mean

if TYPE_CHECKING:
    from alignment.rollout import Completion


@dataclass
class EvalResult:
    """One task's numbers on one model.

    `metrics` are flat floats (`{"accuracy": 0.75, "pass@4": 0.9}`); `samples` are rows for the
    report (`prompt`, `completion`, `answer`, `correct` or `score`); `main` is the headline metric
    (tables, bar chart; default: the first); `higher_is_better` colors deltas (metrics it does not
    name are neutral); `skipped` says why a task did not run on this model; `scores` are the main metric's
    per-row values, in row order (so two stages compare row by row: `evals.alarm`).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    main: Optional[str] = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    skipped: Optional[str] = None
    scores: list[float] = field(default_factory=list)  # per row, the main metric (its mean): paired stage comparisons

    def to_json(self, max_samples: int = 8) -> dict:
        out = {"metrics": {k: float(v) for k, v in self.metrics.items()}, "samples": self.samples[:max_samples],
               "main": self.main or next(iter(self.metrics), None), "higher_is_better": self.higher_is_better}
        if self.scores:
            out["scores"] = [round(float(v), 6) for v in self.scores]
        if self.skipped:
            out["skipped"] = self.skipped
        return out


class EvalTask(Protocol):
    def __call__(self, ctx: "EvalContext", **args: Any) -> EvalResult: ...


TASKS: Registry[EvalTask] = Registry("eval task")

# eval `args` read by the context rather than the task: the generation engine and its batch size
CONTEXT_ARGS = {"backend": get_args(Backend), "batch_size": None}
DEFAULT_BACKEND = "auto"
DEFAULT_BATCH_SIZE = 16


PROMPT_FORMATS = ("prompt", "messages", "preference")  # the rows `row_prompt` finds a prompt in


def task(name: str, *, needs_data: bool = True, formats: tuple[str, ...] = PROMPT_FORMATS,
         column_args: tuple[str, ...] = ()) -> Callable[[EvalTask], EvalTask]:
    """Register an eval task; `needs_data=False` for tasks that bring their own (lm_eval). `formats` are the
    `alignment.data.FORMATS` its rows may have, `column_args` the task's arguments that name a further column
    it reads (e.g. `answer_column`): `check_task_data` checks both at validate time."""

    def decorator(fn):
        fn.needs_data, fn.formats, fn.column_args = needs_data, formats, column_args
        return TASKS.register(name)(fn)

    return decorator


def check_task_data(name: str, args: dict, columns) -> list[str]:
    """Problems with the columns of an eval's dataset (those of its first row) for task `name`. [] = fine."""
    from alignment.data import FORMATS

    fn = TASKS.get(name)
    cols = set(columns)
    problems = []
    if not any(set(FORMATS[f]) <= cols for f in fn.formats):
        wanted = " or ".join("/".join(FORMATS[f]) for f in fn.formats)
        problems.append(f"eval task '{name}' needs {wanted} rows; the dataset has columns {sorted(cols)}")
    params = task_params(fn)
    for arg in fn.column_args:
        column = args.get(arg, params[arg].default)
        if column not in cols:
            problems.append(f"eval task '{name}' reads column '{column}' (its `{arg}`); the dataset has columns {sorted(cols)}")
    return problems


def task_params(fn: EvalTask) -> dict[str, inspect.Parameter]:
    """The task's settable keywords (everything after `ctx`)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_task_args(name: str, args: dict, *, has_data: bool) -> list[str]:
    """Problems with one eval entry: unknown task, unknown / missing args, an arg its type refuses, no dataset.
    [] = fine. A number YAML 1.1 reads as a string (`temperature: 1e-1`) becomes the number, in `args`."""
    if name not in TASKS:
        return [f"unknown eval task '{name}'{did_you_mean(name, TASKS.names())}; known: {', '.join(TASKS.names())}"]
    fn = TASKS.get(name)
    params, hints = task_params(fn), typing.get_type_hints(fn)
    problems = []
    for key, value in args.items():
        if key in CONTEXT_ARGS:
            choices = CONTEXT_ARGS[key]
            if choices and value not in choices:
                problems.append(f"eval '{name}': {key} must be one of {', '.join(choices)} (got {value!r})")
            elif key == "batch_size" and not (isinstance(value, int) and value > 0):
                problems.append(f"eval '{name}': batch_size must be a positive integer (got {value!r})")
        elif key not in params:
            valid = list(params) + list(CONTEXT_ARGS)
            problems.append(f"eval '{name}' has no argument '{key}'{did_you_mean(key, valid)}; its arguments: {', '.join(valid)}")
        elif key in hints:
            try:
                typed = pydantic.TypeAdapter(hints[key]).validate_python(value)  # lax: "1e-1" -> 0.1
            except pydantic.ValidationError as err:
                problems.append(f"eval '{name}': {key}: {err.errors()[0]['msg'].lower()} (got {value!r})")
            else:
                if isinstance(value, str):
                    args[key] = typed
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in args:
            problems.append(f"eval '{name}' needs argument '{key}' (add `{key}: ...` under its args)")
    if getattr(fn, "needs_data", True) and not has_data:
        problems.append(f"eval '{name}' needs a dataset: add `data: NAME` naming one under data:")
    return problems


# ---------------------------------------------------------------- prompts and tokens


def prompt_text(prompt) -> str:
    """A prompt for display: a string as is, a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"] or prompt
    return str(users[-1].get("content", "")) if users else ""


def encode_pair(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) the way TRL's SFT/DPO trainers build them.

    Strings: the completion gets EOS appended. Conversations: the completion is what the chat
    template writes after the prompt's opened assistant turn, up to and including EOS.
    """
    from alignment.rollout import encode_prompts
    from rewards.base import completion_text

    [prompt_ids] = encode_prompts(tokenizer, [prompt])
    if isinstance(prompt, str):
        text = completion_text(completion)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return prompt_ids, ids + [tokenizer.eos_token_id]
    messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    full = tokenizer.apply_chat_template(list(prompt) + list(messages), tokenize=False)
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if full.startswith(head):
        tail = full[len(head):]
    else:  # a template that rewrites earlier turns: fall back to the content and EOS
        tail = completion_text(messages) + tokenizer.eos_token
    eos = tokenizer.eos_token
    if eos and eos in tail:  # drop what the template writes after EOS (ChatML's newline)
        tail = tail[: tail.rindex(eos) + len(eos)]
    return prompt_ids, tokenizer(tail, add_special_tokens=False)["input_ids"]


def split_messages(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """A conversation -> (prompt turns, the final assistant turn)."""
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1:]
    raise ValueError(f"a messages row must end with an assistant turn, got role {messages[-1].get('role')!r}")


class Session:
    """What outlives one task: loaded models and reward scorers, the open rollout engine, and
    generations already made (base's completions are reused by every stage's `win_rate`).
    `release()` between stages."""

    def __init__(self):
        self.models: dict[str, Any] = {}
        self.scorers: dict[str, Any] = {}  # reward-model folder -> alignment.models.RewardScorer
        self.tokenizers: dict[str, Any] = {}
        self.engine: Any = None  # an alignment.rollout engine
        self.engine_key: Optional[tuple] = None
        self.generations: dict[str, list[list[Completion]]] = {}
        self.backends: dict[str, str] = {}  # requested -> resolved (auto prints its choice once)

    def release(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.engine_key = None, None
        self.models.clear()
        self.scorers.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


@dataclass
class EvalContext:
    """Everything a task needs to evaluate one model.

    Attributes:
        model_path: full weights of the model under evaluation (a stage's `model/` or `merged/`,
            or any local folder / hub id).
        rows: the eval dataset's rows ([] for tasks without data).
        stage: `base`, a stage name, or `model` for `alignkit eval --model`.
        reference_path: the stage's `from` model (KL, implicit DPO reward); None for base.
        base_path: the recipe's starting model (win_rate's baseline).
        resolve: stage name or folder -> full-weights folder (reward stages, references).
        dtype: torch dtype name for every model loaded here.
        backend: rollout engine (auto | hf | vllm | vllm-server); batch_size: prompts per call.
    """

    model_path: str
    rows: list[dict] = field(default_factory=list)
    stage: str = "model"
    reference_path: Optional[str] = None
    base_path: Optional[str] = None
    resolve: Optional[Callable[[str], str]] = None
    dtype: str = "float32"
    backend: str = DEFAULT_BACKEND
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    console: Any = None
    session: Session = field(default_factory=Session)

    # ------------------------------------------------------------ models

    @property
    def tokenizer(self):
        return self.tokenizer_for(self.model_path)

    def tokenizer_for(self, path: str):
        if path not in self.session.tokenizers:
            from alignment.models import load_tokenizer

            self.session.tokenizers[path] = load_tokenizer(path)
        return self.session.tokenizers[path]

    def model(self, path: Optional[str] = None):
        """A loaded causal LM (eval mode, cached for the stage): the evaluated one by default."""
        path = path or self.model_path
        if path not in self.session.models:
            from alignment.models import load_pretrained

            import torch

            model = load_pretrained(path, dtype=self.dtype, head="causal_lm")
            if torch.cuda.is_available():
                model = model.to("cuda")
            self.session.models[path] = model.eval()
        return self.session.models[path]

    def model_dir(self, name_or_path: str) -> str:
        """Full weights of a stage of this run (by name), `base`, or a folder."""
        if name_or_path == "base" and self.base_path:
            return self.base_path
        if self.resolve is not None:
            return self.resolve(name_or_path)
        if Path(name_or_path).is_dir():
            return str(name_or_path)
        raise ValueError(f"'{name_or_path}' is neither a stage of a run nor a model folder")

    # ------------------------------------------------------------ generation

    def generate(self, prompts: list, max_new_tokens: int, n: int = 1, temperature: float = 0.0, *,
                 model_path: Optional[str] = None) -> list[list[Completion]]:
        """`n` completions per prompt (strings or conversations) from `model_path` (default: the
        evaluated model) through an `alignment.rollout` engine; greedy at temperature 0. Remembered
        for the rest of the session."""
        from alignment.rollout import SamplingConfig, encode_prompts

        path = model_path or self.model_path
        key = json.dumps([path, self.backend, prompts, max_new_tokens, n, temperature, self.seed], default=str)
        if key in self.session.generations:
            return self.session.generations[key]
        ids = encode_prompts(self.tokenizer_for(path), prompts)
        engine = self._engine(path)
        step = self.batch_size if engine.name == "hf" else max(len(ids), 1)  # vLLM batches itself
        out: list[list[Completion]] = []
        with _progress(self.console, f"generating ({self.stage})", len(ids)) as advance:
            for start in range(0, len(ids), step):
                sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=n,
                                          seed=self.seed + start)
                out += engine.generate(ids[start:start + step], sampling)
                advance(len(ids[start:start + step]))
        self.session.generations[key] = out
        return out

    def _engine(self, path: str):
        """The session's engine for `path` (one at a time: another model closes the open one)."""
        from alignment.rollout import make_engine, resolve_backend

        key = (path, self.backend)
        if self.session.engine_key == key:
            return self.session.engine
        if self.session.engine is not None:
            self.session.engine.close()
        if self.backend not in self.session.backends:
            self.session.backends[self.backend] = resolve_backend(self.backend)
        backend = self.session.backends[self.backend]
        model = self.model(path) if backend == "hf" else None  # hf generates with the cached model
        self.session.engine = make_engine(backend, path, tokenizer=self.tokenizer_for(path), model=model,
                                          dtype=self.dtype, seed=self.seed)
        self.session.engine_key = key
        return self.session.engine

    # ------------------------------------------------------------ scoring

    def token_logprobs(self, pairs: list[tuple[list[int], list[int]]], *, model_path: Optional[str] = None) -> list[list[float]]:
        """Per completion token, log p(token | prompt, earlier tokens) under a model (one forward pass
        per batch, teacher-forced, temperature 1). `pairs`: (prompt ids, completion ids)."""
        import torch

        from alignment.algos import logprobs_from_logits

        model = self.model(model_path)
        device = next(model.parameters()).device
        pad = 0  # right padding under a zero mask: its value is never read
        out: list[list[float]] = []
        with _progress(self.console, f"scoring ({self.stage})", len(pairs)) as advance, torch.no_grad():
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[start:start + self.batch_size]
                seqs = [p + c for p, c in batch]
                width = max(len(s) for s in seqs)
                input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                logprobs = logprobs_from_logits(logits, input_ids[:, 1:])  # (B, width - 1)
                for row, (p, c) in enumerate(batch):
                    # token i of the sequence is predicted at position i - 1
                    out.append(logprobs[row, len(p) - 1:len(p) - 1 + len(c)].tolist())
                advance(len(batch))
        return out

    def reward_scores(self, reward_stage: str, prompts: list, completions: list) -> list[float]:
        """Scores of an earlier `reward` stage's model (a stage name or a folder), one per completion,
        through `alignment.models.RewardScorer` -- the scorer of the `reward_model` reward."""
        from alignment.models import RewardScorer

        folder = self.model_dir(reward_stage)
        if folder not in self.session.scorers:
            try:
                self.session.scorers[folder] = RewardScorer.load(folder, dtype=self.dtype, batch_size=self.batch_size)
            except ValueError as err:
                raise ValueError(f"reward_stage '{reward_stage}': {err}") from None
        return self.session.scorers[folder](prompts, completions, batch_size=self.batch_size)


class _progress:
    """A transient rich progress bar (nothing when the console is not a terminal); yields `advance(n)`."""

    def __init__(self, console, description: str, total: int):
        self.console, self.description, self.total = console, description, total
        self.bar = None

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = self.console
        if console is not None and console.is_terminal and self.total > 0:
            self.bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total)
        return (lambda n: self.bar.advance(self.task, n)) if self.bar else (lambda n: None)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
