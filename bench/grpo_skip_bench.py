"""GRPO's training phase with and without zero-advantage rows (`alignment.stages.grpo.SkipZeroAdvantageRows`), side
by side in one process: the quick start's GRPO settings (8 prompts x 8 completions, max 8 new tokens, T 0.7,
loss dapo, beta 0, micro-batches of 16) on the given model, with real rollouts and rewards (math_accuracy).

    .venv/bin/python bench/grpo_skip_bench.py [--model PATH] [--batches 3] [--repeats 3] [--out FILE.json]

For each of `--batches` rollouts (8 prompts each), the loss + backward of all its micro-batches is timed with the
skip on and off, interleaved `--repeats` times; reported: the share of rows with advantage 0, seconds per
rollout's training (median), their ratio, and the largest relative gradient difference between the two.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "quickstart" / "data" / "prompts.jsonl"


def train_phase(trainer, inputs: dict, micro: int, skip: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds for loss + backward over `inputs` in micro-batches of `micro` rows, and the summed gradients."""
    trainer._rows_skippable = (lambda batch: type(trainer)._rows_skippable(trainer, batch)) if skip else (lambda batch: False)
    trainer.model.zero_grad()
    rows = inputs["advantages"].shape[0]
    started = time.perf_counter()
    for start in range(0, rows, micro):
        part = {k: v[start:start + micro] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
                for k, v in inputs.items()}
        trainer._compute_loss(trainer.model, part).backward()
    seconds = time.perf_counter() - started
    return seconds, [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def main() -> None:
    from alignment.models import bundled_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_path = args.model or str(bundled_path("smollm2-135m-instruct"))

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignment.stages.grpo import SkipZeroAdvantageRows
    from rewards import build_reward

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()][: 8 * args.batches]
    config = GRPOConfig(output_dir="/tmp/grpo-skip-bench", per_device_train_batch_size=64, num_generations=8,
                        max_completion_length=8, temperature=0.7, loss_type="dapo", beta=0.0, report_to=[],
                        use_cpu=True, seed=0, logging_steps=1, gradient_checkpointing=False)
    trainer = type("GRPOTrainer", (SkipZeroAdvantageRows, GRPOTrainer), {})(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), reward_funcs=[build_reward({"name": "math_accuracy"})],
        args=config, train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.current_gradient_accumulation_steps = 4  # 64 rows as 4 micro-batches of 16, as the quick start
    trainer.model.train()
    torch.manual_seed(0)
    result = []
    for b in range(args.batches):
        batch = [r for r in rows[8 * b: 8 * b + 8] for _ in range(8)]
        inputs = trainer._generate_and_score_completions(batch)
        zero = float((inputs["advantages"] == 0).float().mean())
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for skip in (False, True):
                seconds, grads = train_phase(trainer, inputs, 16, skip)
                times[skip].append(seconds)
                if skip:
                    skipped_grads = grads
                else:
                    every_grads = grads
        diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                   for a, b in zip(skipped_grads, every_grads))
        line = {"rollout": b, "zero_advantage_frac": zero, "every_row_s": statistics.median(times[False]),
                "skipped_s": statistics.median(times[True]), "max_rel_grad_diff": diff}
        line["ratio"] = line["skipped_s"] / line["every_row_s"]
        print(json.dumps(line), flush=True)
        result.append(line)
    summary = {"model": model_path, "threads": torch.get_num_threads(), "rollouts": result,
               "ratio_median": statistics.median(r["ratio"] for r in result)}
    print(json.dumps({k: v for k, v in summary.items() if k != "rollouts"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
