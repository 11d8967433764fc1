"""The bench's baseline: the same SFT / GRPO runs as `bench/bench.py`'s alignkit recipes, written directly in
TRL (same model, data, LoRA, optimizer settings, seed and steps; GRPO generates with TRL's own HF `generate`).

    python bench/raw_trl.py sft|grpo --model PATH --data FILE.jsonl --out DIR --steps N [--batch B] [--lr LR]
        [--num-generations G] [--max-new-tokens T] [--beta KL] [--save-steps S] [--bf16] [--gradient-checkpointing on|off]

Checkpoints as TRL's defaults write them (`save_strategy="steps"`): every `--save-steps` and at the last step,
as the alignkit side does with the same `save_steps`. Gradient checkpointing: TRL's default (on) unless
`--gradient-checkpointing off`; `bench.py` passes the alignkit side's value (alignkit's default is off).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["sft", "grpo"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.0, help="GRPO's KL coefficient")
    parser.add_argument("--save-steps", type=int, default=500, help="TRL's default")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="TRL's default: on")
    return parser


def trainer_config(args: argparse.Namespace):
    """The TRL config the script trains with: `SFTConfig` or `GRPOConfig` from the command line's `args`."""
    common = dict(output_dir=args.out, max_steps=args.steps, learning_rate=args.lr, per_device_train_batch_size=args.batch,
                  logging_steps=1, save_steps=args.save_steps, report_to=[], seed=args.seed, bf16=args.bf16, use_cpu=True,
                  disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing == "on")
    if args.method == "sft":
        from trl import SFTConfig

        return SFTConfig(**common, max_length=1024)
    from trl import GRPOConfig

    return GRPOConfig(**common, num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                      temperature=0.7, beta=args.beta, loss_type="dapo", log_completions=False)


def main() -> None:
    args = parser().parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in open(args.data)]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    config = trainer_config(args)
    if args.method == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)
    else:
        from trl import GRPOTrainer

        sys.path.insert(0, str(ROOT))
        from rewards.math import math_accuracy  # the same reward function as the alignkit side

        trainer = GRPOTrainer(model=model, reward_funcs=[math_accuracy], args=config, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
