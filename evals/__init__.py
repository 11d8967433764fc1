"""Evaluation tasks, registered by name, run on base and every stage of a recipe; and the report.

A task is `fn(ctx: EvalContext, **args) -> EvalResult` (see `evals.base`: `ctx.generate` gives
`alignment.rollout.Completion`s, `ctx.reward_scores` scores with `alignment.models.RewardScorer`);
the built-in ones are in `evals.tasks`: accuracy (greedy + pass@k), reward_score, win_rate, judge_score,
judge_win_rate (an LLM judge, `rewards.judge`),
preference_accuracy, perplexity, kl, length, lm_eval. `run_evals` writes `runs/NAME/evals/STAGE.json`, `write_report` the report.

    @task("my_task")
    def my_task(ctx: EvalContext, *, max_new_tokens: int = 64) -> EvalResult:
        completions = ctx.generate([r["prompt"] for r in ctx.rows], max_new_tokens)
        return EvalResult({"my_metric": ...}, samples=[...])
"""
from __future__ import annotations

from evals.base import TASKS, EvalContext, EvalResult, check_task_args, check_task_data, task
from evals import tasks  # noqa: F401 -- registers the built-in tasks
from evals.runner import EvalError, check_evals, eval_names, run_evals

__all__ = ["TASKS", "EvalContext", "EvalResult", "EvalError", "task", "check_task_args", "check_task_data",
           "check_evals", "eval_names", "run_evals", "write_report"]


def write_report(run_dir):
    """`evals.report.write_report`, imported on use."""
    from evals.report import write_report as write

    return write(run_dir)
