"""Rollout engines on one model: start-up, greedy throughput at batch 8 and 64, weight-sync time, and whether the
engine follows the policy after a sync (mean |engine log-prob - trainer log-prob|, TRL's
`sampling_logp_difference`, before and after syncing perturbed weights).

    .venv/bin/python bench/rollout_bench.py [--model PATH] [--engines hf vllm vllm-server] [--compile]
        [--repeats 3] [--out FILE.json]

The default model is the bundled SmolLM2-135M-Instruct (`make demo` puts it in the cache), in the precision the
quick start trains in here (`bf16: auto`: bf16 where the CPU or GPU has it natively, else fp32).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


def default_model() -> str:
    import platformdirs

    return str(Path(platformdirs.user_cache_dir("alignkit")) / "bundled" / "smollm2-135m-instruct")


@torch.no_grad()
def trainer_logprob_diff(policy, completions) -> float:
    """Mean |engine log-prob - log-prob from a forward pass of `policy`| over all completion tokens."""
    gaps = []
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        start = len(c.prompt_ids)
        logprobs = policy(ids).logits[0, start - 1:-1].float().log_softmax(-1)
        want = logprobs.gather(-1, ids[0, start:, None]).squeeze(-1)
        gaps.append((want - torch.tensor(c.logprobs)).abs())
    return torch.cat(gaps).mean().item()


def bench_engine(name: str, model_path: str, dtype: str, policy, perturbed, prompts, compiled: bool = False,
                 repeats: int = 3) -> dict:
    from alignment.rollout import SamplingConfig, make_engine

    greedy = SamplingConfig(max_new_tokens=64, temperature=0)
    started = time.perf_counter()
    kwargs = {"enforce_eager": False} if compiled and name == "vllm" else {}
    engine = make_engine(name, model_path, dtype=dtype, **kwargs)  # hf loads its own copy: its sync copies weights
    row = {"engine": name + (" (compiled)" if kwargs else ""), "startup_s": time.perf_counter() - started}
    engine.generate(prompts[:2], SamplingConfig(max_new_tokens=4, temperature=0))  # first-call warm-up
    for batch in (8, 64):  # the median of `repeats` timed calls: one call varies by ~10 % here
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = engine.generate(prompts[:batch], greedy)
            tokens = sum(len(c.completion_ids) for per_prompt in outputs for c in per_prompt)
            rates.append(tokens / (time.perf_counter() - started))
        row[f"tok_per_s_batch{batch}"] = statistics.median(rates)
    sample = [per_prompt[0] for per_prompt in engine.generate(prompts[:8], greedy)]
    row["logprob_diff_synced"] = trainer_logprob_diff(policy, sample)
    sample = [per_prompt[0] for per_prompt in engine.generate(prompts[:8], greedy)]
    row["logprob_diff_stale"] = trainer_logprob_diff(perturbed, sample)  # the policy moved, the engine did not
    started = time.perf_counter()
    engine.sync_weights(perturbed)
    row["sync_s"] = time.perf_counter() - started
    sample = [per_prompt[0] for per_prompt in engine.generate(prompts[:8], greedy)]
    row["logprob_diff_after_sync"] = trainer_logprob_diff(perturbed, sample)
    engine.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--dtype", help="default: what `bf16: auto` picks here (bfloat16 where native, else float32)")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm", "vllm-server"])
    parser.add_argument("--compile", action="store_true",
                        help="in-process vllm with torch.compile (enforce_eager=False), as vllm.LLM defaults to; "
                             "alignkit runs it eager on CPU, where compiling costs 40-70 s of start-up")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (their median is kept)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.dtype is None:
        from alignment.models import bf16_supported

        args.dtype = "bfloat16" if bf16_supported() else "float32"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.rollout import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # open-ended prompts, so that nearly every completion runs the full 64 tokens
    topics = ["cat", "ship", "robot", "river", "king", "garden", "storm", "clock"]
    styles = ["a story", "a poem", "a letter", "a song", "a diary entry", "a news report", "a fable", "a dialogue"]
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": f"Write {style} about a {topic}."}]
                                         for style in styles for topic in topics])  # 64 prompts
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    perturbed = copy.deepcopy(policy)  # a stand-in for one optimizer step: 2 % noise on every weight
    torch.manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.02 * param.float().std() * torch.randn_like(param))

    rows = [bench_engine(name, args.model, args.dtype, policy, perturbed, prompts, args.compile, args.repeats)
            for name in args.engines]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.out:
        meta = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "max_new_tokens": 64,
                "repeats": args.repeats}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":  # vLLM's workers may spawn: keep the entry point guarded
    main()
