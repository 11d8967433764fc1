"""GRPO and PPO step time with `hf` vs `vllm` rollouts: each (method, backend) runs as a one-stage recipe
through `alignkit run` on the bundled SmolLM2-135M-Instruct (LoRA r16, bf16 autocast) and the quick-start
prompts, and the per-step times are read back from the stage's metrics.jsonl.

    .venv/bin/python bench/rl_step_bench.py [--steps 5] [--methods grpo ppo] [--backends hf vllm] [--out FILE.json]

A step's time is its median over steps 2..N (step 1 carries the engine's warm-up). Both log `timing/step`
(alignment/metrics.py); PPO also its phases (generate, forward, train, sync).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "quickstart" / "data" / "prompts.jsonl"

# 8 prompts x 8 completions x up to 32 tokens per step, for both methods
ROLLOUT = {"num_generations": 8, "max_new_tokens": 32, "temperature": 1.0}
STAGES = {
    "grpo": {"rewards": [{"name": "math_accuracy"}],
             "args": {"learning_rate": 1.0e-4, "per_device_train_batch_size": 64, "beta": 0.0, "bf16": True,
                      "save_steps": 1000}},
    "ppo": {"rewards": [{"name": "math_accuracy"}],
            # 8 prompts x 8 completions = 32 sequences per forward/backward x 2 minibatches
            "args": {"learning_rate": 1.0e-4, "per_device_train_batch_size": 32, "num_mini_batches": 2,
                     "num_ppo_epochs": 2, "bf16": True, "save_steps": 1000}},
}


def recipe(method: str, backend: str, steps: int) -> dict:
    spec = STAGES[method]
    return {
        "name": f"bench-{method}-{backend}", "seed": 0,
        "model": {"name_or_path": "bundled:smollm2-135m-instruct", "dtype": "float32",
                  "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}},
        "data": {"prompts": {"path": str(PROMPTS)}},
        "stages": {method: {"method": method, "data": ["prompts"], "rewards": spec["rewards"],
                            "rollout": {"backend": backend, **ROLLOUT},
                            "args": {**spec["args"], "max_steps": steps}}},
    }


def bench(method: str, backend: str, steps: int, workdir: Path) -> dict:
    path = workdir / f"{method}-{backend}.yaml"
    path.write_text(yaml.safe_dump(recipe(method, backend, steps), sort_keys=False))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alignment.cli", "run", str(path), "--run-dir", str(workdir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method}/{backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / f"bench-{method}-{backend}" / method / "metrics.jsonl").open()]
    rows = [r for r in rows if "timing/step" in r]  # TRL's last line is the run's summary
    row = {"method": method, "backend": backend, "steps": len(rows),
           "stage_wall_s": time.perf_counter() - started,
           "step_s": statistics.median(r["timing/step"] for r in rows[1:]),
           "completion_tokens_per_step": statistics.mean(r["response/length_mean"] * 64 for r in rows[1:])}
    if method == "ppo":
        for phase in ("generate", "forward", "train", "sync"):
            row[f"{phase}_s"] = statistics.median(r[f"timing/{phase}"] for r in rows[1:])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["grpo", "ppo"], choices=sorted(STAGES))
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        rows = [bench(m, b, args.steps, Path(tmp)) for m in args.methods for b in args.backends]
    for method in args.methods:
        by = {r["backend"]: r for r in rows if r["method"] == method}
        if "hf" in by and "vllm" in by:
            by["vllm"]["speedup_vs_hf"] = by["hf"]["step_s"] / by["vllm"]["step_s"]
    columns = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns)
              + " |")
    if args.out:
        meta = {"model": "bundled:smollm2-135m-instruct", "adapter": "lora r16", "precision": "bf16 autocast",
                "rollout": ROLLOUT, "prompts_per_step": 8, "steps": args.steps}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
