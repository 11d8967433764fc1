"""The built-in eval tasks. Each is `fn(ctx, **args) -> EvalResult`; its keyword defaults are the
defaults of the recipe's `evals[i].args`.

    evals:
      - {task: accuracy, data: test, args: {k: [1, 4], max_new_tokens: 64}}
      - {task: win_rate, data: prompts, args: {reward_stage: rm}}
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Union

from evals.base import EvalContext, EvalResult, encode_pair, prompt_text, split_messages, task


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def row_prompt(row: dict):
    """The prompt of an eval row: `prompt`, a conversation's turns before the last answer, or the
    shared prefix of a chosen/rejected pair."""
    from alignment.data import split_prompt

    if row.get("prompt") is not None:
        return row["prompt"]
    if "messages" in row:
        return split_messages(row["messages"])[0]
    if "chosen" in row and "rejected" in row:
        return split_prompt(row)[0]
    raise ValueError(f"eval rows need a `prompt` column (or `messages`, or `chosen`/`rejected`); got columns {sorted(row)}")


def _prompts(ctx: EvalContext) -> list:
    if not ctx.rows:
        raise ValueError(f"eval on '{ctx.stage}' has no rows: give it a dataset (`data:`)")
    return [row_prompt(r) for r in ctx.rows]


# ---------------------------------------------------------------- accuracy and pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv 2107.03374),
    eq. 1 and its numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


MATCHES = ("math", "exact")


def verify(completions: list[str], golds: list[str], match: str) -> list[bool]:
    """Is each completion's answer the gold one? `math`: math-verify (`rewards.math.math_accuracy`;
    a gold it cannot read counts as wrong); `exact`: the `<answer>` (or whole text), stripped, equals it."""
    from rewards.base import answer_text

    if match == "exact":
        return [answer_text(c).strip() == g.strip() for c, g in zip(completions, golds)]
    from rewards.math import math_accuracy

    return [s == 1.0 for s in math_accuracy(None, completions, answer=golds)]


@task("accuracy", column_args=("answer_column",))
def accuracy(ctx: EvalContext, *, max_new_tokens: int = 256, match: str = "math",
             k: Union[int, list[int], None] = None, num_samples: Optional[int] = None,
             temperature: float = 1.0, answer_column: str = "answer") -> EvalResult:
    """Greedy accuracy against the `answer` column, and pass@k from `num_samples` sampled completions.

    Args:
        max_new_tokens: generation budget per completion.
        match: `math` (math-verify: 1/2 = 0.5 = \\frac{1}{2}) or `exact` (string equality).
        k: pass@k for this k (or each of a list); none by default.
        num_samples: completions sampled per prompt for pass@k (default: the largest k).
        temperature: sampling temperature for pass@k (greedy accuracy always uses 0).
        answer_column: the column with the gold answers; rows without one are left out.
    """
    if match not in MATCHES:
        raise ValueError(f"accuracy: match must be one of {', '.join(MATCHES)} (got {match!r})")
    rows = [r for r in ctx.rows if r.get(answer_column) not in (None, "")]
    if not rows:
        raise ValueError(f"accuracy: no row has a gold answer in column '{answer_column}' "
                         f"(columns: {sorted(ctx.rows[0]) if ctx.rows else 'no rows'})")
    prompts = [row_prompt(r) for r in rows]
    golds = [str(r[answer_column]) for r in rows]
    greedy = [g[0].text for g in ctx.generate(prompts, max_new_tokens)]
    correct = verify(greedy, golds, match)
    metrics = {"accuracy": _mean(correct)}
    ks = sorted({k} if isinstance(k, int) else set(k or []))
    if ks:
        n = num_samples or ks[-1]
        if n < ks[-1] or ks[0] < 1:
            raise ValueError(f"accuracy: pass@k needs 1 <= k <= num_samples, got k={k}, num_samples={n}")
        groups = ctx.generate(prompts, max_new_tokens, n=n, temperature=temperature)
        hits = [sum(verify([g.text for g in group], [gold] * n, match)) for group, gold in zip(groups, golds)]
        for kk in ks:
            metrics[f"pass@{kk}"] = _mean(pass_at_k(n, c, kk) for c in hits)
    samples = [{"prompt": prompt_text(p), "completion": c, "answer": g, "correct": ok}
               for p, c, g, ok in zip(prompts, greedy, golds, correct)]
    return EvalResult(metrics, samples, main="accuracy", higher_is_better={m: True for m in metrics},
                      scores=[float(ok) for ok in correct])


# ---------------------------------------------------------------- reward model scores


@task("reward_score")
def reward_score(ctx: EvalContext, *, reward_stage: str, max_new_tokens: int = 128,
                 temperature: float = 0.0) -> EvalResult:
    """Mean score of the model's completions under an earlier `reward` stage's model.

    Args:
        reward_stage: the recipe stage (method: reward) whose model scores, or a model folder.
        max_new_tokens, temperature: generation settings (greedy by default).
    """
    prompts = _prompts(ctx)
    texts = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature)]
    scores = ctx.reward_scores(reward_stage, prompts, texts)
    metrics = {"reward": _mean(scores), "reward_std": statistics.pstdev(scores)}
    samples = [{"prompt": prompt_text(p), "completion": t, "score": s} for p, t, s in zip(prompts, texts, scores)]
    return EvalResult(metrics, samples, main="reward", higher_is_better={"reward": True}, scores=scores)


@task("win_rate")
def win_rate(ctx: EvalContext, *, reward_stage: str, baseline: str = "base", max_new_tokens: int = 128,
             temperature: float = 0.0) -> EvalResult:
    """Share of prompts where the reward model scores the model's completion above the baseline's
    (a tie counts half). Base against itself is 0.5 by construction.

    Args:
        reward_stage: the recipe stage (method: reward) whose model judges, or a model folder.
        baseline: the stage (or folder) to beat; default: the recipe's base model.
        max_new_tokens, temperature: generation settings for both models (greedy by default).
    """
    prompts = _prompts(ctx)
    ours = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature)]
    theirs = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature,
                                                model_path=ctx.model_dir(baseline))]
    a = ctx.reward_scores(reward_stage, prompts, ours)
    b = ctx.reward_scores(reward_stage, prompts, theirs)
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    metrics = {"win_rate": _mean(wins), "reward": _mean(a), "baseline_reward": _mean(b)}
    samples = [{"prompt": prompt_text(p), "completion": o, "baseline": t, "score": x, "baseline_score": y,
                "correct": None if x == y else x > y}  # a tie is neither a win nor a loss
               for p, o, t, x, y in zip(prompts, ours, theirs, a, b)]
    return EvalResult(metrics, samples, main="win_rate", higher_is_better={"win_rate": True, "reward": True},
                      scores=wins)


# ---------------------------------------------------------------- LLM judge (rewards.judge)


def _judge(ctx: EvalContext, judge: str, tokenizer: Optional[str], max_new_tokens: int):
    """The `rewards.judge.Judge` for an eval: a stage of the run or folder (`ctx.model_dir`), or a loopback URL."""
    from rewards.judge import Judge

    source = judge if judge.startswith(("http://", "https://")) else ctx.model_dir(judge)
    return Judge(source, tokenizer=ctx.model_dir(tokenizer) if tokenizer else None, backend="hf", dtype=ctx.dtype,
                 max_new_tokens=max_new_tokens, batch_size=ctx.batch_size)


@task("judge_score")
def judge_score(ctx: EvalContext, *, judge: str, template: Optional[str] = None, verdict: str = "score",
                min_score: float = 1.0, max_score: float = 10.0, tokenizer: Optional[str] = None,
                max_new_tokens: int = 128, judge_max_new_tokens: int = 16, temperature: float = 0.0) -> EvalResult:
    """Mean verdict of an LLM judge (`rewards.judge`) on the model's completions; `unparsed` is the share of
    replies that gave no verdict (left out of the mean).

    Args:
        judge: a stage of the run, a model folder, or http://127.0.0.1:PORT (an OpenAI-compatible server).
        template, verdict, min_score, max_score, tokenizer: as the `judge` reward's.
        max_new_tokens, temperature: the evaluated model's generation (greedy by default).
        judge_max_new_tokens: the judge's reply length.
    """
    from rewards.judge import TEMPLATES

    prompts = _prompts(ctx)
    texts = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature)]
    columns = {k: [r.get(k) for r in ctx.rows] for k in ctx.rows[0] if k not in ("prompt", "completion")}
    scorer = _judge(ctx, judge, tokenizer, judge_max_new_tokens)
    try:
        scores = scorer.score(prompts, texts, template=template or TEMPLATES[verdict], verdict=verdict,
                              min_score=min_score, max_score=max_score, columns=columns)
    finally:
        scorer.close()
    parsed = [s for s in scores if s is not None]
    metrics = {"judge_score": _mean(parsed), "unparsed": 1 - len(parsed) / len(scores)}
    samples = [{"prompt": prompt_text(p), "completion": t, "score": s} for p, t, s in zip(prompts, texts, scores)]
    return EvalResult(metrics, samples, main="judge_score", higher_is_better={"judge_score": True, "unparsed": False})


@task("judge_win_rate")
def judge_win_rate(ctx: EvalContext, *, judge: str, baseline: str = "base", template: Optional[str] = None,
                   tokenizer: Optional[str] = None, max_new_tokens: int = 128, judge_max_new_tokens: int = 8,
                   temperature: float = 0.0) -> EvalResult:
    """Share of prompts where an LLM judge prefers the model's completion to the baseline's, asked pairwise in
    both orders (`rewards.judge.Judge.compare`: a split verdict counts half). Prompts where no reply names A or B
    are left out and counted in `unparsed`.

    Args:
        judge: a stage of the run, a model folder, or http://127.0.0.1:PORT.
        baseline: the stage (or folder) to beat; default: the recipe's base model.
        template: jinja2 pairwise question (prompt, completion_a, completion_b); default
            `rewards.judge.PAIRWISE_TEMPLATE`. tokenizer: as the `judge` reward's.
        max_new_tokens, temperature: generation of both models (greedy by default).
        judge_max_new_tokens: the judge's reply length.
    """
    from rewards.judge import PAIRWISE_TEMPLATE

    prompts = _prompts(ctx)
    ours = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature)]
    theirs = [g[0].text for g in ctx.generate(prompts, max_new_tokens, temperature=temperature,
                                                model_path=ctx.model_dir(baseline))]
    scorer = _judge(ctx, judge, tokenizer, judge_max_new_tokens)
    try:
        wins = scorer.compare(prompts, ours, theirs, template=template or PAIRWISE_TEMPLATE)
    finally:
        scorer.close()
    decided = [w for w in wins if w is not None]
    metrics = {"judge_win_rate": _mean(decided), "unparsed": 1 - len(decided) / len(wins)}
    samples = [{"prompt": prompt_text(p), "completion": o, "baseline": t, "score": w,
                "correct": None if w in (None, 0.5) else w > 0.5}
               for p, o, t, w in zip(prompts, ours, theirs, wins)]
    return EvalResult(metrics, samples, main="judge_win_rate",
                      higher_is_better={"judge_win_rate": True, "unparsed": False})


# ---------------------------------------------------------------- held-out preference pairs


@task("preference_accuracy", formats=("preference",))
def preference_accuracy(ctx: EvalContext, *, reward_stage: Optional[str] = None, reference: Optional[str] = None,
                        beta: float = 0.1) -> EvalResult:
    """Share of held-out pairs where `chosen` outscores `rejected`, and the mean margin.

    The score is a reward stage's model when `reward_stage` is set; otherwise the implicit DPO
    reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, arXiv 2305.18290, eq. 5)
    with the stage's `from` model as pi_ref -- so base, which has no reference, is skipped.

    Args:
        reward_stage: score with this reward stage (or folder) instead of the implicit reward.
        reference: pi_ref for the implicit reward (a stage or folder); default: the stage's `from`.
        beta: scales the implicit reward (the margin, not the accuracy); DPO's usual 0.1.
    """
    from alignment.data import split_prompt
    from rewards.base import completion_text

    if not ctx.rows or not {"chosen", "rejected"} <= set(ctx.rows[0]):
        raise ValueError(f"preference_accuracy needs chosen/rejected rows; got columns {sorted(ctx.rows[0]) if ctx.rows else 'no rows'}")
    triples = [split_prompt(r) for r in ctx.rows]
    if reward_stage is not None:
        prompts = [p for p, _, _ in triples]
        chosen = ctx.reward_scores(reward_stage, prompts, [completion_text(c) for _, c, _ in triples])
        rejected = ctx.reward_scores(reward_stage, prompts, [completion_text(r) for _, _, r in triples])
    else:
        ref = ctx.model_dir(reference) if reference else ctx.reference_path
        if ref is None:
            return EvalResult(skipped=f"'{ctx.stage}' has no reference model for the implicit DPO reward "
                                      f"(set reward_stage:, or reference:)")
        tok = ctx.tokenizer
        pairs = [encode_pair(tok, p, c) for p, c, _ in triples] + [encode_pair(tok, p, r) for p, _, r in triples]
        policy = [sum(lp) for lp in ctx.token_logprobs(pairs)]
        refs = [sum(lp) for lp in ctx.token_logprobs(pairs, model_path=ref)]
        rewards = [beta * (a - b) for a, b in zip(policy, refs)]
        chosen, rejected = rewards[:len(triples)], rewards[len(triples):]
    wins = [c > r for c, r in zip(chosen, rejected)]
    metrics = {"accuracy": _mean(wins), "margin": _mean(c - r for c, r in zip(chosen, rejected))}
    samples = [{"prompt": prompt_text(p), "chosen": completion_text(c), "rejected": completion_text(r),
                "margin": sc - sr, "correct": ok}
               for (p, c, r), sc, sr, ok in zip(triples, chosen, rejected, wins)]
    return EvalResult(metrics, samples, main="accuracy", higher_is_better={"accuracy": True, "margin": True},
                      scores=[float(ok) for ok in wins])


# ---------------------------------------------------------------- perplexity and KL


def _pair_of(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an SFT row: prompt/completion, messages, or text."""
    if "messages" in row:
        prompt, completion = split_messages(row["messages"])
        return encode_pair(tokenizer, prompt, completion)
    if "completion" in row:
        return encode_pair(tokenizer, row["prompt"], row["completion"])
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"]
        return ids[:1], ids[1:]  # every token but the first is predicted
    raise ValueError(f"perplexity needs prompt/completion, messages or text rows; got columns {sorted(row)}")


@task("perplexity", formats=("messages", "prompt_completion", "text"))
def perplexity(ctx: EvalContext, *, max_length: Optional[int] = None) -> EvalResult:
    """Completion-token perplexity exp(mean NLL) over held-out SFT rows (token-weighted mean).

    Args:
        max_length: cut each prompt + completion to this many tokens (None: keep all).
    """
    if not ctx.rows:
        raise ValueError("perplexity needs rows: give it a dataset (`data:`)")
    pairs = [_pair_of(ctx.tokenizer, r) for r in ctx.rows]
    if max_length:
        pairs = [(p[:max_length - 1], c[:max(max_length - len(p), 1)]) for p, c in pairs]
    logprobs = ctx.token_logprobs(pairs)
    tokens = sum(len(lp) for lp in logprobs)
    nll = -sum(sum(lp) for lp in logprobs) / tokens
    metrics = {"perplexity": math.exp(nll), "nll": nll, "tokens": float(tokens)}
    samples = [{"prompt": prompt_text(row_prompt(r)) if "text" not in r else r["text"][:80],
                "target": ctx.tokenizer.decode(c, skip_special_tokens=True),
                "perplexity": math.exp(-sum(lp) / max(len(lp), 1))}
               for r, (_, c), lp in zip(ctx.rows, pairs, logprobs)]
    return EvalResult(metrics, samples, main="perplexity", higher_is_better={"perplexity": False, "nll": False})


@task("kl")
def kl(ctx: EvalContext, *, reference: Optional[str] = None, max_new_tokens: int = 64, num_samples: int = 1,
       temperature: float = 1.0) -> EvalResult:
    """KL(policy || reference) on the prompts: per-token estimates on completions sampled from the policy.

    `kl` is the token-mean of k1 = log pi - log pi_ref (unbiased); `kl_k3` of k3 = e^-d - 1 + d
    (unbiased, >= 0; Schulman 2020); `kl_seq` the mean per-completion sum of k1.

    Args:
        reference: the reference (a stage or folder); default: the stage's `from` model.
        max_new_tokens, num_samples: completions sampled per prompt and their length.
        temperature: 1.0 samples from the policy itself, as the estimators assume.
    """
    import torch

    from alignment.algos import compute_kl, masked_mean

    ref = ctx.model_dir(reference) if reference else ctx.reference_path
    if ref is None:
        return EvalResult(skipped=f"'{ctx.stage}' is its own reference (set reference: to compare with another model)")
    prompts = _prompts(ctx)
    groups = ctx.generate(prompts, max_new_tokens, n=num_samples, temperature=temperature)
    pairs = [(g.prompt_ids, g.completion_ids) for group in groups for g in group]
    policy, refs = ctx.token_logprobs(pairs), ctx.token_logprobs(pairs, model_path=ref)
    width = max(len(lp) for lp in policy)
    pad = lambda rows: torch.tensor([r + [0.0] * (width - len(r)) for r in rows])  # noqa: E731
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in policy])
    k1 = compute_kl(pad(policy), pad(refs), "k1", response_mask=mask)  # (B, T)
    k3 = compute_kl(pad(policy), pad(refs), "k3", response_mask=mask)
    metrics = {"kl": masked_mean(k1, mask).item(), "kl_k3": masked_mean(k3, mask).item(),
               "kl_seq": k1.sum(-1).mean().item()}
    samples = [{"prompt": prompt_text(p), "completion": group[0].text, "kl": float(row.sum())}
               for p, group, row in zip(prompts, groups, k1[::num_samples])]
    return EvalResult(metrics, samples, main="kl")


@task("length")
def length(ctx: EvalContext, *, max_new_tokens: int = 256, num_samples: int = 1, temperature: float = 0.0) -> EvalResult:
    """Completion length in tokens (with the stop token): mean, median, max, and the share cut off
    at `max_new_tokens`.

    Args:
        max_new_tokens, num_samples, temperature: generation settings (one greedy completion by default).
    """
    prompts = _prompts(ctx)
    groups = ctx.generate(prompts, max_new_tokens, n=num_samples, temperature=temperature)
    lengths = [len(g.completion_ids) for group in groups for g in group]
    metrics = {"mean": _mean(lengths), "median": float(statistics.median(lengths)), "max": float(max(lengths)),
               "truncated_frac": _mean(g.finish_reason == "length" for group in groups for g in group)}
    samples = [{"prompt": prompt_text(p), "completion": group[0].text, "tokens": len(group[0].completion_ids)}
               for p, group in zip(prompts, groups)]
    return EvalResult(metrics, samples, main="mean")


# ---------------------------------------------------------------- lm-evaluation-harness


LM_EVAL_MISSING = "lm-eval is not installed: pip install alignkit[eval]"


@task("lm_eval", needs_data=False)
def lm_eval_task(ctx: EvalContext, *, tasks: list[str], num_fewshot: Optional[int] = None,
                 limit: Union[int, float, None] = None) -> EvalResult:
    """Benchmarks of lm-evaluation-harness (`tasks: [gsm8k, hellaswag]`) on the model's folder;
    skipped with a message where lm-eval is not installed.

    Args:
        tasks: lm-eval task names.
        num_fewshot: few-shot examples (None: each task's default).
        limit: evaluate only this many examples per task (or this fraction).
    """
    try:
        import lm_eval
    except ImportError:
        return EvalResult(skipped=LM_EVAL_MISSING)
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": ctx.model_path, "dtype": ctx.dtype}, tasks=list(tasks),
        num_fewshot=num_fewshot, limit=limit, batch_size=ctx.batch_size, random_seed=ctx.seed,
        numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed)
    metrics, better = {}, {}
    for name, values in (out or {}).get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",")[0]  # "acc,none" -> "acc"
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[f"{name}/{metric}"] = float(value)
            direction = out.get("higher_is_better", {}).get(name, {}).get(metric)
            if direction is not None:
                better[f"{name}/{metric}"] = bool(direction)
    return EvalResult(metrics, [], higher_is_better=better)
