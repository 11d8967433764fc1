"""The ceiling on greedy decoding throughput that this machine's matrix multiplies set, for one model: what any
engine (HF `generate`, vLLM) could reach at a batch size if it did nothing but the model's linear layers.

One decode step of B sequences multiplies a (B, in) activation by every weight of the model once: q/k/v/o, the MLP's
gate/up/down per layer, and the LM head (B, hidden) x (hidden, vocab). This times exactly those GEMMs with
`torch.nn.functional.linear` at the model's shapes and dtype, on the threads the engines get, takes the fastest of
`--repeats` rounds, and reports `ceiling tok/s = B / (sum of GEMM seconds per step)`. Attention over the cache,
norms, sampling and the engine's own bookkeeping come on top, so a real engine stays below it; an engine's share of
the ceiling says how much a faster engine could still gain.

    .venv/bin/python bench/decode_roof.py [--model PATH] [--batch 8 64] [--dtype float32] [--threads 2]
        [--out bench/results/decode_roof.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def gemm_shapes(config) -> list[tuple[int, int, int]]:
    """(in_features, out_features, count per step) of every linear layer a decode step runs, from a HF config."""
    text = config.get_text_config()
    hidden, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return [(hidden, heads * head_dim, layers), (hidden, kv * head_dim, 2 * layers), (heads * head_dim, hidden, layers),
            (hidden, inter, 2 * layers), (inter, hidden, layers), (hidden, text.vocab_size, 1)]


def step_seconds(shapes, batch: int, dtype: torch.dtype, repeats: int) -> float:
    """Fastest of `repeats` rounds of one step's GEMMs (each shape `count` times, fresh weights per shape)."""
    gemms = [(torch.randn(batch, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype), count)
             for n_in, n_out, count in shapes]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for x, w, count in gemms:
            for _ in range(count):
                torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    from transformers import AutoConfig

    from alignment.models import bundled_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder or hub id (default: the bundled SmolLM2-135M)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_roof.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or str(bundled_path("smollm2-135m-instruct"))
    shapes = gemm_shapes(AutoConfig.from_pretrained(model))
    dtype = getattr(torch, args.dtype)
    step_seconds(shapes, max(args.batch), dtype, 3)  # warm-up: thread pool, allocator
    rows = []
    for batch in args.batch:
        seconds = step_seconds(shapes, batch, dtype, args.repeats)
        flops = 2 * batch * sum(n_in * n_out * count for n_in, n_out, count in shapes)
        rows.append({"batch": batch, "gemm_s_per_step": seconds, "ceiling_tok_per_s": batch / seconds,
                     "gflops": flops / seconds / 1e9})
        print(f"batch {batch}: {seconds * 1e3:.1f} ms of GEMMs a step -> at most {batch / seconds:.0f} tok/s "
              f"({flops / seconds / 1e9:.1f} GFLOP/s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"model": model, "dtype": args.dtype, "threads": args.threads,
                                             "repeats": args.repeats}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
