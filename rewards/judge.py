"""LLM-as-judge reward: another language model reads each (prompt, completion) and gives a verdict.

The judge is an earlier stage of the recipe, `base`, a local model folder (or `bundled:NAME`), or an
OpenAI-compatible completions server on this machine (`http://127.0.0.1:PORT`, loopback only: prompts and
completions never leave it). It is asked with a jinja2 template the recipe can override, greedily, in
batches, through the rollout layer (`alignment.rollout.make_engine`: `hf` or `vllm` for models, `vllm-server`
for a URL), and its reply is parsed into a score by `VERDICTS`:

- `score`: the first number in the reply, kept when within [min_score, max_score];
- `yes_no`: a leading yes / no -> 1.0 / 0.0;
- a reply that does not parse scores `None` (0 in the total), counted in `reward/judge/missing`
  (`rewards.BoundReward`).

    rewards: [{name: judge, model: sft, verdict: yes_no, template: "Is {{ completion }} the sum asked in {{ prompt }}? yes or no"}]

The pairwise form (`compare`) backs the `judge_win_rate` eval task.
"""
from __future__ import annotations

import math
import re
import urllib.parse
from typing import Callable, Optional

from rewards.base import _TRAINER_KWARGS, REWARDS, completion_text

# What the template sees: `prompt` and `completion` as text, `min_score` / `max_score`, and the row's columns.
TEMPLATES = {
    "score": (
        "Rate how well the response answers the request, from {{ min_score }} (useless) to {{ max_score }} "
        "(perfect).\n\nRequest:\n{{ prompt }}\n\nResponse:\n{{ completion }}\n\nReply with the number only."
    ),
    "yes_no": (
        "Does the response answer the request correctly?\n\nRequest:\n{{ prompt }}\n\nResponse:\n{{ completion }}"
        "\n\nReply yes or no."
    ),
}
_TEMPLATE_NAMES = ("prompt", "completion", "min_score", "max_score")
# Pairwise (`compare`): `prompt`, `completion_a`, `completion_b`; the reply names A or B.
PAIRWISE_TEMPLATE = (
    "Which response answers the request better?\n\nRequest:\n{{ prompt }}\n\nResponse A:\n{{ completion_a }}"
    "\n\nResponse B:\n{{ completion_b }}\n\nReply A or B."
)
LOOPBACK = ("127.0.0.1", "localhost", "::1")

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_CHOICE = re.compile(r"^\W*(?:response\s+)?([AB])\b", re.IGNORECASE)


def parse_score(reply: str, min_score: float, max_score: float) -> Optional[float]:
    """The first number in `reply` when it lies in [min_score, max_score], else None.

    Example:
        >>> parse_score("Score: 7/10", 1, 10), parse_score("11", 1, 10), parse_score("great", 1, 10)
        (7.0, None, None)
    """
    found = _NUMBER.search(reply)
    value = float(found.group()) if found else None
    return value if value is not None and min_score <= value <= max_score else None


def parse_yes_no(reply: str, min_score: float = 0.0, max_score: float = 1.0) -> Optional[float]:
    """1.0 for a reply that starts with yes, 0.0 for no (any case, after punctuation), else None.

    Example:
        >>> parse_yes_no("Yes."), parse_yes_no(" no, it is 5"), parse_yes_no("maybe")
        (1.0, 0.0, None)
    """
    found = _YES_NO.match(reply)
    return None if found is None else float(found.group(1).lower() == "yes")


def parse_choice(reply: str) -> Optional[str]:
    """"A" or "B" for a reply that starts with it (or "Response A"), else None.

    Example:
        >>> parse_choice("B is better"), parse_choice("Response A"), parse_choice("both")
        ('B', 'A', None)
    """
    found = _CHOICE.match(reply)
    return None if found is None else found.group(1).upper()


VERDICTS: dict[str, Callable[[str, float, float], Optional[float]]] = {"score": parse_score, "yes_no": parse_yes_no}


def _template(text: str):
    """A jinja2 template in which an unknown variable is an error (not silently empty)."""
    import jinja2

    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"reward 'judge': template line {err.lineno}: {err.message}") from None


def check_url(url: str) -> None:
    """Refuse a judge server that is not on this machine.

    Raises:
        ValueError: not http(s), or a host other than 127.0.0.1 / localhost / ::1.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise ValueError(f"reward 'judge': server URL {url!r} must be http://127.0.0.1:PORT (or localhost, [::1]): "
                         f"prompts and completions are not sent off this machine")


def as_text(prompt) -> str:
    """A prompt for the judge: a string as is; a conversation as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {completion_text([m])}" for m in prompt)


# ---------------------------------------------------------------- the judge model

# Resolves a stage name (or base) to its full-weights folder; None for other names. Set in a stage child
# (`alignment.stage`), where `model: sft` names this run's sft artifact.
_stage_resolver: Optional[Callable[[str], Optional[str]]] = None
_judges: dict[tuple, "Judge"] = {}


def set_stage_resolver(fn: Optional[Callable[[str], Optional[str]]]) -> None:
    """Install the hook that turns a stage name into a model folder (None removes it); closes cached judges."""
    global _stage_resolver
    _stage_resolver = fn
    for judge in _judges.values():
        judge.close()
    _judges.clear()


class Judge:
    """A judge model behind a rollout engine: `ask(texts)` sends each text as a user turn (the judge's chat
    template) and returns its greedy replies; `score` and `compare` render the templates and parse.

    Args:
        source: a model folder (full weights or an adapter artifact), hub id, or a loopback server URL.
        tokenizer: the tokenizer folder; default: `source` (a URL needs one: prompts are sent as token ids).
        backend: rollout engine for a model (hf | vllm | auto); a URL is always `vllm-server`.
        dtype: weights' dtype for a model; max_new_tokens: reply length; batch_size: prompts per `hf` call.
    """

    def __init__(self, source: str, *, tokenizer: Optional[str] = None, backend: str = "hf", dtype: str = "float32",
                 max_new_tokens: int = 16, batch_size: int = 16):
        from alignment.models import load_tokenizer, resolve_model_path
        from alignment.rollout import make_engine, resolve_backend

        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        if "://" in source:
            check_url(source)
            if tokenizer is None:
                raise ValueError(f"reward 'judge': a server judge ({source}) needs `tokenizer:`, the served model's "
                                 f"folder: prompts are sent as token ids")
            folder = resolve_model_path(tokenizer)
            self.tokenizer = load_tokenizer(folder)
            self.engine = make_engine("vllm-server", folder, tokenizer=self.tokenizer, url=source, dtype=dtype)
            return
        folder = resolve_model_path(source)
        self.tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer else folder)
        model = None
        if resolve_backend(backend) == "hf":  # an adapter artifact is merged on load; on the GPU when there is one
            import torch

            from alignment.models import load_pretrained

            model = load_pretrained(folder, dtype=dtype, head="causal_lm").eval()
            model = model.to("cuda") if torch.cuda.is_available() else model
        self.engine = make_engine(backend, folder, tokenizer=self.tokenizer, model=model, dtype=dtype)

    def ask(self, texts: list[str]) -> list[str]:
        """The judge's greedy reply to each text (a user turn), in batches."""
        from alignment.rollout import SamplingConfig, encode_prompts

        ids = encode_prompts(self.tokenizer, [[{"role": "user", "content": t}] for t in texts])
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        step = self.batch_size if self.engine.name == "hf" else max(len(ids), 1)  # vLLM batches itself
        return [group[0].text for start in range(0, len(ids), step)
                for group in self.engine.generate(ids[start:start + step], sampling)]

    def score(self, prompts: list, completions: list, *, template: str, verdict: str, min_score: float,
              max_score: float, columns: Optional[dict] = None) -> list[Optional[float]]:
        """One parsed verdict per completion (None where the reply does not parse). `columns`: per-row values
        the template may use (one list per column)."""
        tmpl, parse = _template(template), VERDICTS[verdict]
        columns = columns or {}
        texts = [tmpl.render(prompt=as_text(p), completion=completion_text(c), min_score=min_score,
                             max_score=max_score, **{k: v[i] for k, v in columns.items()})
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        return [parse(reply, min_score, max_score) for reply in self.ask(texts)]

    def compare(self, prompts: list, ours: list, theirs: list, *, template: str = PAIRWISE_TEMPLATE
                ) -> list[Optional[float]]:
        """Per prompt, 1.0 when `ours` wins, 0.0 when `theirs` does, 0.5 for a split: each pair is asked in both
        orders (the judge's position bias cancels). None when neither order's reply parses."""
        tmpl = _template(template)
        n = len(prompts)
        texts = [tmpl.render(prompt=as_text(p), completion_a=completion_text(a), completion_b=completion_text(b))
                 for p, a, b in [*zip(prompts, ours, theirs), *zip(prompts, theirs, ours)]]
        choices = [parse_choice(r) for r in self.ask(texts)]
        out = []
        for first, second in zip(choices[:n], choices[n:]):  # ours is A in the first round, B in the second
            votes = [v for v in (first == "A" if first else None, second == "B" if second else None) if v is not None]
            out.append(sum(votes) / len(votes) if votes else None)
        return out

    def close(self) -> None:
        self.engine.close()


def load_judge(model: str, **kwargs) -> Judge:
    """The judge for `model` (a stage name through the installed resolver, else a folder, hub id or URL),
    cached per source and settings until `set_stage_resolver` is called again."""
    source = (_stage_resolver(model) if _stage_resolver is not None else None) or model
    key = (source, *sorted(kwargs.items()))
    if key not in _judges:
        _judges[key] = Judge(source, **kwargs)
    return _judges[key]


def check_judge_params(params: dict) -> None:
    """What can be checked before a model loads (`rewards.build_reward` calls it): the verdict, the score range,
    the template's syntax, a server URL on loopback.

    Raises:
        ValueError: naming the parameter.
    """
    verdict = params.get("verdict", "score")
    if verdict not in VERDICTS:
        raise ValueError(f"reward 'judge': verdict must be one of {', '.join(VERDICTS)} (got {verdict!r})")
    low, high = params.get("min_score", 1.0), params.get("max_score", 10.0)
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
        raise ValueError(f"reward 'judge': need numbers min_score < max_score (got {low!r}, {high!r})")
    if params.get("template") is not None:
        _template(str(params["template"]))
    model = params.get("model")
    if isinstance(model, str) and "://" in model:
        check_url(model)
        if params.get("tokenizer") is None:
            raise ValueError("reward 'judge': a server judge needs `tokenizer:`, the served model's folder "
                             "(prompts are sent as token ids)")


@REWARDS.register("judge")
def judge(prompts, completions, *, model: str, template: Optional[str] = None, verdict: str = "score",
          min_score: float = 1.0, max_score: float = 10.0, tokenizer: Optional[str] = None, backend: str = "hf",
          dtype: str = "float32", max_new_tokens: int = 16, batch_size: int = 16, **columns) -> list[float]:
    """A judge model's verdict on each completion: a number in [min_score, max_score] (`verdict: score`) or
    1.0 / 0.0 (`verdict: yes_no`); NaN where the reply does not parse (`BoundReward` makes it None, counted).

    Args:
        model: an earlier stage, `base`, a model folder / `bundled:NAME`, or http://127.0.0.1:PORT (an
            OpenAI-compatible completions server on this machine, e.g. `vllm serve`).
        template: jinja2 text of the question (variables: prompt, completion, min_score, max_score and the
            dataset's columns, e.g. `answer`); default `TEMPLATES[verdict]`.
        verdict: `score` or `yes_no` (`VERDICTS`).
        min_score, max_score: the range a `score` verdict must fall in (and the template states).
        tokenizer: the judge's tokenizer folder; needed with a URL.
        backend: `hf` (default: beside a stage's own vLLM rollout engine it reserves no second KV cache) or
            `vllm`; a URL uses `vllm-server`.
        dtype, max_new_tokens, batch_size: the judge's weights, reply length and `hf` batch.
    """
    row_columns = {k: list(v) for k, v in columns.items() if k not in _TRAINER_KWARGS and k not in _TEMPLATE_NAMES}
    found = load_judge(model, tokenizer=tokenizer, backend=backend, dtype=dtype, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    scores = found.score(prompts, completions, template=template or TEMPLATES[verdict], verdict=verdict,
                         min_score=min_score, max_score=max_score, columns=row_columns)
    # NaN, not None ("not applicable"): `BoundReward` scores it None and counts it in reward/judge/missing
    return [math.nan if s is None else s for s in scores]


judge.check_params = check_judge_params
