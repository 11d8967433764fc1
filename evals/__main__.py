"""`python -m evals RUN_DIR [STAGE ...]`: evaluate a run's base and stages, print the table and
write the report. `alignkit run` starts this as a child process, like a stage: vLLM and CUDA
memory stay out of the orchestrator."""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from alignment.console import Console
    from alignment.rundir import RunDir
    from evals import EvalError, run_evals, write_report
    from evals.cli import print_eval_table

    console = Console(highlight=False)
    run_dir, stages = Path(argv[0]), argv[1:] or None
    recipe = RunDir(run_dir).read_recipe()
    try:
        results = run_evals(recipe, run_dir, stages=stages, console=console)
    except EvalError as e:
        console.print(f"[bold red]error:[/] {e}")
        return 1
    print_eval_table(results, console, ["base"] + recipe.order())
    report = write_report(run_dir)
    console.print(f"report: [bold]{report}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
