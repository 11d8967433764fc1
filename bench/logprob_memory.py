"""Peak memory of PPO's log-probs + entropy, forward and backward, on a tiny random Llama at SmolLM2's vocabulary
(49152): the plain (B, T, V) logits path against `alignment.stages.ppo.policy_forward` (chunked from the hidden
states, `alignment.algos.logprobs_from_hidden`). One mode per process, so each peak is its own:

    for m in plain chunked plain chunked; do taskset -c 1 .venv/bin/python bench/logprob_memory.py $m; done
"""
from __future__ import annotations

import resource
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.algos import RolloutBatch, entropy_from_logits, logprobs_from_logits
from alignment.stages import ppo

B, Q, T, V = 64, 32, 16, 49152  # 8 prompts x 8 completions, 32 prompt and 16 response tokens


def plain(model, batch, temperature):
    logits = model(**ppo._model_inputs(batch), logits_to_keep=T + 1).logits[:, -T - 1:-1]
    return logprobs_from_logits(logits, batch.response_ids, temperature), entropy_from_logits(logits, temperature)


def main() -> None:
    mode = sys.argv[1]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    batch = RolloutBatch(query_ids=torch.randint(0, V, (B, Q)), query_mask=torch.ones(B, Q, dtype=torch.bool),
                         response_ids=torch.randint(0, V, (B, T)), response_mask=torch.ones(B, T, dtype=torch.bool),
                         old_logprobs=torch.zeros(B, T), scores=torch.zeros(B))
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if mode == "plain":
        logprobs, entropy = plain(model, batch, 0.7)
    else:
        logprobs, entropy, _ = ppo.policy_forward(model, batch, 0.7, entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{mode}: peak +{(peak - before) / 1024:.0f} MiB, {time.perf_counter() - started:.1f} s, "
          f"sum of log-probs {logprobs.sum().item():.4f}")


if __name__ == "__main__":
    main()
