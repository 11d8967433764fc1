"""Bytes held per logit element by each log-prob path, alone (the constants in `alignment.memory.LOGITS`).

One process per case: random hidden states (N, H) and an LM head (V, H) in fp32 on this CPU; the peak-RSS mark is
reset (`/proc/self/clear_refs` = 5), the path's forward + backward runs, and the peak over the baseline is divided
by the logit elements the path holds at once (fused: one tile of min(N, 4096) x min(V, 32768); full: N x V;
chunked: 256 x V).

    python bench/memory_logits.py            # prints one JSON line per case
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [("fused", 1020, 32000, 512), ("fused", 4096, 32000, 512), ("fused", 510, 49152, 576),
         ("full", 1020, 32000, 512), ("full", 510, 49152, 576), ("chunked", 256, 32000, 512)]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(path: str, n: int, vocab: int, hidden_size: int) -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import selective_log_softmax

    from alignment.algos import logprobs_from_hidden

    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size)
    targets = torch.randint(0, vocab, (n,))
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    if path == "fused":  # TRL's fused LM head, the outputs SFTTrainer asks for
        lp = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                          ("log_probs", "entropy", "is_top1"))[0]
        elements = min(n, 4096) * min(vocab, 32768)
    elif path == "full":  # the model's logits, then one log-softmax
        lp = selective_log_softmax((hidden @ weight.t()).float(), targets)
        elements = n * vocab
    else:  # our PPO's chunks, with the entropy
        lp = logprobs_from_hidden(hidden[None], targets[None], lambda h: h @ weight.t(), entropy=True)[0]
        elements = min(n, 256) * vocab
    (-lp.sum()).backward()
    peak = _status("VmHWM") - base
    return {"path": path, "tokens": n, "vocab": vocab, "hidden": hidden_size, "peak_mib": round(peak / 2**20, 1),
            "bytes_per_element": round(peak / elements, 1)}


def main() -> int:
    if sys.argv[1:2] == ["--case"]:
        print(json.dumps(measure(sys.argv[2], *map(int, sys.argv[3:6]))))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for case in CASES:
        subprocess.run([sys.executable, __file__, "--case", *map(str, case)], check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
