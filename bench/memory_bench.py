"""Measured vs estimated peak memory of real CPU stage runs (issue 15 point 5, check (a)).

Each case is a one-stage recipe run through the pipeline (`Pipeline.run`), its stage child started as this file
with `--child`: the child imports torch / transformers / trl / peft and every stage module first, then resets the
kernel's peak-RSS mark (`/proc/self/clear_refs` = 5) and reads VmRSS as the baseline; after `trainer.train()`
(before the artifact is written, whose serialisation is not training memory) it reads VmHWM. Measured =
VmHWM - baseline: the tensors plus what the stage builds (tokenizer, dataset, allocator slack). The estimate is
`alignment.memory.plan_recipe` for the same recipe (fp32 on CPU). Rows are exactly `max_length` tokens long
(character tokenizer), so batch x sequence is what the planner assumes.

    python bench/memory_bench.py --out bench/results/memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(run_dir: str, stage: str) -> int:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from alignment import stage as stage_main
    from alignment.stages import StageContext, load_stages

    load_stages()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline = _status("VmRSS")
    train = StageContext.train

    def measured_train(self, trainer):
        out = train(self, trainer)
        Path(run_dir, stage, "memory_probe.json").write_text(json.dumps({"baseline": baseline, "peak": _status("VmHWM")}))
        return out

    StageContext.train = measured_train
    return stage_main.main([run_dir, stage])


def make_model(path: Path, *, hidden: int, layers: int, intermediate: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.testing import make_tokenizer

    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def rows(method: str, length: int, n: int = 64) -> list[dict]:
    """Rows of exactly `length` tokens once templated (the tokenizer is one token per character)."""
    body = "0123456789" * (length // 10 + 1)
    if method == "sft":
        return [{"text": body[: length - 1]} for _ in range(n)]  # + EOS
    half = length // 2
    return [{"prompt": body[:half], "chosen": body[: length - half - 1], "rejected": body[1: length - half]} for _ in range(n)]


OVERHEAD = "stage-overhead-tiny"  # a ~50k-parameter model: what the stage builds whatever the shapes
CASES = [  # (name, model, method, adapter, gradient checkpointing, batch, max_length)
    (OVERHEAD, "h64", "sft", None, False, 1, 32),
    ("sft-full-h512", "h512", "sft", None, False, 4, 256),
    ("sft-full-h512-gc", "h512", "sft", None, True, 4, 256),
    ("sft-lora-h512", "h512", "sft", {"r": 16, "dropout": 0.0}, False, 4, 256),
    ("sft-full-h768-b8", "h768", "sft", None, False, 8, 256),
    ("dpo-lora-h512", "h512", "dpo", {"r": 16, "dropout": 0.0}, False, 2, 256),
    ("dpo-full-h512", "h512", "dpo", None, False, 2, 256),
    ("sft-lora-smollm2-135m", "bundled:smollm2-135m-instruct", "sft", {"r": 16, "dropout": 0.0}, False, 2, 256),
    ("orpo-lora-h512", "h512", "orpo", {"r": 16, "dropout": 0.0}, False, 2, 256),  # full logits (trl.experimental)
]
MODELS = {"h64": dict(hidden=64, layers=1, intermediate=128, vocab=128),
          "h512": dict(hidden=512, layers=8, intermediate=1536, vocab=32000),
          "h768": dict(hidden=768, layers=6, intermediate=2048, vocab=16000)}


def prepare_case(case, work: Path):
    """The case's model (built once per shape), rows and one-stage recipe, loaded; and its estimate."""
    import yaml

    from alignment.memory import plan_recipe
    from alignment.validate import load_recipe

    name, model, method, adapter, gc, batch, length = case
    folder = work / name
    folder.mkdir(exist_ok=True)
    if model in MODELS:
        model_path = work / model
        if not model_path.exists():
            make_model(model_path, **MODELS[model])
        model = str(model_path)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(method, length)))
    args = {"max_steps": 2, "save_steps": 100, "per_device_train_batch_size": batch, "max_length": length}
    recipe = {"name": name, "model": {"name_or_path": model, "dtype": "float32", "gradient_checkpointing": gc,
                                      **({"adapter": adapter} if adapter else {})},
              "data": {"d": {"path": "data.jsonl"}}, "stages": {"s": {"method": method, "data": ["d"], "args": args}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rec = load_recipe(folder / "recipe.yaml")
    return rec, plan_recipe(rec, folder, device="cpu")["s"].estimate  # the stage runs on this CPU


def run_case(case, work: Path) -> dict:
    from alignment.memory import GiB
    from alignment.pipeline import Pipeline

    name, model, method, adapter, gc, batch, length = case
    rec, est = prepare_case(case, work)
    pipe = Pipeline(rec, work / "runs")
    pipe.command = lambda stage: [sys.executable, __file__, "--child", str(pipe.run_dir), stage]
    start = time.time()
    pipe.run()
    probe = json.loads((pipe.run_dir / "s" / "memory_probe.json").read_text())
    measured = probe["peak"] - probe["baseline"]
    return {"case": name, "method": method, "adapter": bool(adapter), "gradient_checkpointing": gc, "batch": batch,
            "max_length": length, "baseline_gib": round(probe["baseline"] / GiB, 3),
            "measured_gib": round(measured / GiB, 3), "seconds": round(time.time() - start, 1), **_estimated(est, measured)}


def _estimated(est, measured_bytes: float) -> dict:
    return {"estimate_gib": round(est.peak / 2**30, 3), "error_pct": round(100 * (est.peak - measured_bytes) / measured_bytes, 1),
            "parts_gib": est.gib()["parts_gib"]}


def torchtune_check() -> list[dict]:
    """Check (b): plan torchtune's published Llama-3.1-8B LoRA / QLoRA setup and compare with its README."""
    from alignment.memory import plan_recipe
    from alignment.validate import load_recipe

    path = ROOT / "bench" / "memory" / "torchtune-llama31-8b.yaml"
    plan = plan_recipe(load_recipe(path), path.parent)
    published = {"lora": 16.2, "qlora": 7.4}  # GiB, torchtune README "Memory and training speed", 1x RTX 4090
    return [{"case": f"torchtune llama-3.1-8b {k}", "published_gib": v, "estimate_gib": plan[k].estimate.gib()["peak_gib"],
             "error_pct": round(100 * (plan[k].estimate.peak / 2**30 - v) / v, 1), "parts_gib": plan[k].estimate.gib()["parts_gib"]}
            for k, v in published.items()]


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    parser.add_argument("--cases", nargs="*", help="case names (default: all); the other rows of --out are kept")
    parser.add_argument("--reestimate", action="store_true", help="keep the measured rows of --out, redo the estimates")
    opts = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    published = torchtune_check()
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.reestimate:
            measured = json.loads(Path(opts.out).read_text())["measured_cpu"]
            for m in measured:
                _, est = prepare_case(next(c for c in CASES if c[0] == m["case"]), Path(tmp))
                m.update(_estimated(est, m["measured_gib"] * 2**30))
        elif opts.cases and Path(opts.out).is_file():  # run only these cases, keep the other recorded rows
            measured = [m for m in json.loads(Path(opts.out).read_text())["measured_cpu"] if m["case"] not in opts.cases]
        for case in CASES if not opts.reestimate else []:
            if opts.cases and case[0] not in opts.cases:
                continue
            measured.append(run_case(case, Path(tmp)))
            print(json.dumps(measured[-1]), flush=True)
    fixed = next((m["measured_gib"] for m in measured if m["case"] == OVERHEAD), None)
    for m in measured:  # net of the stage's fixed cost (tokenizer, datasets, trainer) measured on the tiny model
        if fixed is not None and m["case"] != OVERHEAD:
            net = m["measured_gib"] - fixed
            m.update(net_gib=round(net, 3), error_net_pct=round(100 * (m["estimate_gib"] - net) / net, 1))
    Path(opts.out).write_text(json.dumps({"measured_cpu": measured, "published": published}, indent=1) + "\n")
    for row in published:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
