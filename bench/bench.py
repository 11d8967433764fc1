"""`make bench`: alignkit against the same runs written directly in TRL, side by side in one run.

Each case is a fresh process tree (pinned with `taskset` to `--cpus`), measured from outside: wall time, CPU
time (user + sys of the whole tree, from `wait4`), and peak memory = the largest sum of RSS over the tree,
sampled every 20 ms (the orchestrator counts: it is memory the run holds). The cases alternate
(trl, alignkit, trl, alignkit, ...) `--repeats` times, so background load hits both sides alike; a ratio is the
median alignkit / median TRL.

    .venv/bin/python bench/bench.py [--quick] [--repeats N] [--cpus 0] [--methods sft grpo ppo] [--out-dir bench/results]

Cases: SFT alignkit vs raw TRL (bench/raw_trl.py); GRPO alignkit vs raw TRL at the same rollout size and KL
term (HF generate on both sides); PPO vs GRPO (alignkit) at that rollout size and KL term; vLLM (eager, then
compiled) vs HF generate at batch 64 (bench/rollout_bench.py; skipped in --quick). Full: the bundled SmolLM2-135M-Instruct on the quick-start data.
--quick: a tiny random Llama at SmolLM2's real vocabulary (49152), where the log-prob memory is the real one
and the trunk's is nothing; a few steps, no vLLM -- the test suite runs it to prove the script works.
Writes bench/results/bench[-quick].json and .md, and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "quickstart" / "data"
GOALS = {"cpu_s": 1.02, "peak_gb": 1.05}  # alignkit / raw TRL; RL peak: GOAL_RL_PEAK x raw TRL GRPO
GOAL_RL_PEAK, GOAL_PPO_STEP, GOAL_VLLM = 0.5, 1.3, 2.5
METHODS = ("sft", "grpo", "ppo")  # the cases' prefixes (`cases`)
# runs per case in a full bench: SFT's ~50 s runs vary by up to ~5 % run to run, more than its CPU goal's margin,
# so it takes the median of 4 (3.5 min more); the RL cases' ratios are far from their goals
FULL_REPEATS = {"sft": 4, "grpo": 2, "ppo": 2}


# ------------------------------------------------------------------------------------------ measuring


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants; a process that ends while it is read leaves its part out."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").glob("*"):
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(argv: list[str], *, cpus: str | None, env: dict | None = None, log: Path) -> dict:
    """Run `argv` to the end; wall_s, cpu_s (the tree's user + sys), peak_gb (largest summed tree RSS) and
    root_peak_gb (the first process alone: alignkit's orchestrator, or the raw TRL script)."""
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]  # taskset execs the command: the root keeps its pid
    started, peak, root_peak = time.perf_counter(), 0, 0
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, sum(_rss_bytes(p) for p in _tree(proc.pid)))
            root_peak = max(root_peak, _rss_bytes(proc.pid))
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_gb": peak / 2**30,
            "root_peak_gb": root_peak / 2**30}


# ------------------------------------------------------------------------------------------ the cases


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer: the real 49152-token vocabulary, so the
    log-prob memory is the real one while the trunk is tiny."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.models import bundled_path

    tok = AutoTokenizer.from_pretrained(bundled_path("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def settings(quick: bool, work: Path) -> dict:
    from alignment.models import bf16_supported, bundled_path
    from alignment.recipe import ModelConfig

    model = str(tiny_model(work / "tiny-49k") if quick else bundled_path("smollm2-135m-instruct"))
    # the RL rollout of the measurement in both modes: 8 prompts x 8 completions x 16 tokens
    # save_steps on both sides: no checkpoint but the one at the last step, which TRL's defaults write too
    # gradient checkpointing the same on both sides of every case: alignkit's default (off; TRL's configs default
    # to on, which holds ~0.5 GiB less in SFT at the full size and takes ~30 % more time)
    return {"model": model, "bf16": bf16_supported(), "save_steps": 1000, "sft_steps": 2 if quick else 12, "sft_batch": 8,
            "gradient_checkpointing": ModelConfig.model_fields["gradient_checkpointing"].default,
            "rl_steps": 2 if quick else 4, "num_generations": 8, "rollout_size": 64, "max_new_tokens": 16,
            "kl_coef": 0.05}


def _recipe(work: Path, name: str, s: dict, stage: dict, data: str, **model) -> Path:
    """The alignkit side's recipe of one case; `model`: more keys of its `model:` section."""
    recipe = {"name": name, "seed": 0,
              "model": {"name_or_path": s["model"], "dtype": "float32", **model,
                        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
              "data": {data: {"path": str(DATA / f"{data}.jsonl")}}, "stages": {name: {**stage, "data": [data]}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _alignkit(work: Path, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "alignment.cli", "run", str(recipe), "--run-dir", str(work / "runs"), "--force"]


def cases(s: dict, work: Path) -> dict[str, list[str]]:
    rollout = {"backend": "hf", "num_generations": s["num_generations"], "max_new_tokens": s["max_new_tokens"],
               "temperature": 0.7}
    rl_common = {"learning_rate": 1.0e-4, "max_steps": s["rl_steps"], "bf16": s["bf16"], "save_steps": s["save_steps"]}
    sft = {"method": "sft", "args": {"learning_rate": 1.0e-3, "max_steps": s["sft_steps"], "bf16": s["bf16"],
                                     "per_device_train_batch_size": s["sft_batch"], "save_steps": s["save_steps"]}}
    # alignkit's way with a rollout: forward/backward over two prompts' groups at a time, accumulated to one
    # optimizer step per rollout (the same loss as one pass over all of it; raw TRL below takes it at once)
    micro = {"per_device_train_batch_size": 2 * s["num_generations"],
             "gradient_accumulation_steps": s["rollout_size"] // (2 * s["num_generations"])}
    # the same work per row on all three RL sides: a KL term to the reference (GRPO's beta, PPO's kl_coef: one more
    # no-grad forward each) and every row trained (alignkit's GRPO leaves out zero-advantage rows only with beta 0,
    # and at the bundled model's ~5 % accuracy that is ~80 % of them: a saving of the data, not of the code)
    grpo = {"method": "grpo", "rewards": [{"name": "math_accuracy"}], "rollout": rollout,
            "args": {**rl_common, **micro, "beta": s["kl_coef"], "loss_type": "dapo"}}
    # the same rollout, one minibatch, one epoch: one forward + backward over it, as GRPO's step
    ppo = {"method": "ppo", "rewards": [{"name": "math_accuracy"}], "rollout": rollout,
           "args": {**rl_common, **micro, "num_mini_batches": 1, "num_ppo_epochs": 1, "kl_coef": s["kl_coef"]}}
    raw = [sys.executable, str(ROOT / "bench" / "raw_trl.py"), "--model", s["model"], "--seed", "0",
           "--save-steps", str(s["save_steps"])]
    raw_bf16 = ["--bf16"] if s["bf16"] else []
    gc = s["gradient_checkpointing"]
    checkpointing = ["--gradient-checkpointing", "on" if gc else "off"]
    return {
        "sft/trl": [*raw, "sft", "--data", str(DATA / "sft.jsonl"), "--out", str(work / "trl-sft"),
                    "--steps", str(s["sft_steps"]), "--batch", str(s["sft_batch"]), "--lr", "1e-3", *raw_bf16,
                    *checkpointing],
        "sft/alignkit": _alignkit(work, _recipe(work, "sft", s, sft, "sft", gradient_checkpointing=gc)),
        "grpo/trl": [*raw, "grpo", "--data", str(DATA / "prompts.jsonl"), "--out", str(work / "trl-grpo"),
                     "--steps", str(s["rl_steps"]), "--batch", str(s["rollout_size"]), "--lr", "1e-4",
                     "--num-generations", str(s["num_generations"]), "--max-new-tokens", str(s["max_new_tokens"]),
                     "--beta", str(s["kl_coef"]), *raw_bf16, *checkpointing],
        "grpo/alignkit": _alignkit(work, _recipe(work, "grpo", s, grpo, "prompts", gradient_checkpointing=gc)),
        "ppo/alignkit": _alignkit(work, _recipe(work, "ppo", s, ppo, "prompts", gradient_checkpointing=gc)),
    }


def step_seconds(work: Path, stage: str) -> list[float]:
    """`timing/step` of an alignkit stage's metrics, steps 2.. (step 1 carries the warm-up)."""
    path = work / "runs" / stage / stage / "metrics.jsonl"
    steps = [json.loads(line)["timing/step"] for line in path.open() if "timing/step" in line]
    return steps[1:] or steps


# ------------------------------------------------------------------------------------------ report


def ratio(rows: dict, num: str, den: str, key: str) -> float:
    return statistics.median(r[key] for r in rows[num]) / statistics.median(r[key] for r in rows[den])


def summarise(rows: dict, steps: dict, generate: dict | None) -> list[dict]:
    """One line per compared quantity: value, goal and whether it is met."""
    lines = []
    for method in ("sft", "grpo"):
        if not {f"{method}/alignkit", f"{method}/trl"} <= rows.keys():
            continue  # not benched this time (--methods)
        for key, goal in GOALS.items():
            if method == "grpo" and key == "peak_gb":
                continue  # RL memory has its own goal below
            lines.append({"what": f"{method} {key}: alignkit / raw TRL", "ratio": ratio(rows, f"{method}/alignkit",
                                                                                      f"{method}/trl", key), "goal": goal})
        lines.append({"what": f"{method} wall_s: alignkit / raw TRL",
                      "ratio": ratio(rows, f"{method}/alignkit", f"{method}/trl", "wall_s"), "goal": None})
    for case in ("grpo/alignkit", "ppo/alignkit"):
        if not {case, "grpo/trl"} <= rows.keys():
            continue
        lines.append({"what": f"RL peak_gb: {case} / grpo/trl", "ratio": ratio(rows, case, "grpo/trl", "peak_gb"),
                      "goal": GOAL_RL_PEAK})
    if steps.get("ppo") and steps.get("grpo"):
        lines.append({"what": "step s: ppo / grpo (alignkit, same rollout)", "ratio": steps["ppo"] / steps["grpo"],
                      "goal": GOAL_PPO_STEP})
    if generate:
        lines.append({"what": "generate tok/s at batch 64: vllm / hf", "ratio": generate["vllm_over_hf"],
                      "goal": GOAL_VLLM, "lower_is_better": False})
        lines.append({"what": "generate tok/s at batch 64: vllm compiled (enforce_eager: false) / hf",
                      "ratio": generate["vllm_compiled_over_hf"], "goal": GOAL_VLLM, "lower_is_better": False})
    for line in lines:
        lower = line.pop("lower_is_better", True)
        goal = line["goal"]
        line["met"] = None if goal is None else (line["ratio"] <= goal if lower else line["ratio"] >= goal)
    return lines


def markdown(result: dict) -> str:
    out = ["| case | runs | wall s | CPU s | peak GiB (tree) | root process peak GiB |", "|---|---|---|---|---|---|"]
    for case, runs in result["runs"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_gb", "root_peak_gb")}
        out.append(f"| {case} | {len(runs)} | {med['wall_s']:.1f} | {med['cpu_s']:.1f} | {med['peak_gb']:.2f} | "
                   f"{med['root_peak_gb']:.2f} |")
    out += ["", "| ratio | value | goal | met |", "|---|---|---|---|"]
    for line in result["ratios"]:
        goal = "-" if line["goal"] is None else f"{line['goal']}"
        met = {None: "-", True: "yes", False: "**no**"}[line["met"]]
        out.append(f"| {line['what']} | {line['ratio']:.2f} | {goal} | {met} |")
    return "\n".join(out)


def generate_bench(out: Path, dtype: str, log: Path) -> dict:
    """bench/rollout_bench.py (hf and in-process vllm, all cores: vLLM binds its own threads), read back:
    greedy tok/s at batch 64 and their ratio; then again with vLLM compiled (`rollout.enforce_eager: false`, which
    CPU runs ask for), against the HF run beside it. The compiled run's rows go to `out` with a `-compiled` suffix."""
    result = {}
    for compiled in (False, True):
        path = out.with_name(out.stem + ("-compiled" if compiled else "") + out.suffix)
        argv = [sys.executable, str(ROOT / "bench" / "rollout_bench.py"), "--engines", "hf", "vllm", "--dtype", dtype,
                "--out", str(path), *(["--compile"] if compiled else [])]
        measure(argv, cpus=None, log=log)
        rows = [r["tok_per_s_batch64"] for r in json.loads(path.read_text())["rows"]]  # hf, then vllm
        key = "vllm_compiled" if compiled else "vllm"
        result |= {f"hf_tok_s{'_compiled_run' if compiled else ''}": rows[0], f"{key}_tok_s": rows[1],
                   f"{key}_over_hf": rows[1] / rows[0]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, no vLLM (the CI check)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs per case (default 1 quick; full: {FULL_REPEATS})")
    parser.add_argument("--cpus", default="0" if shutil.which("taskset") else None,
                        help="taskset CPU list for every case ('' = no pinning)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which cases to run (default all); ratios need both of their cases")
    args = parser.parse_args()
    repeats = {m: args.repeats or (1 if args.quick else FULL_REPEATS[m]) for m in args.methods}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "bench-quick" if args.quick else "bench"

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        work = Path(tmp)
        s = settings(args.quick, work)
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        runs: dict[str, list[dict]] = {}
        step_times: dict[str, list[float]] = {}  # every repeat's steps 2..: the ratio is median / median
        for i in range(max(repeats.values())):  # interleaved: each repeat runs every case once, trl before alignkit
            for case, argv in cases(s, work).items():
                if i >= repeats.get(case.split("/")[0], 0):
                    continue
                print(f"bench: {case} ...", flush=True)
                runs.setdefault(case, []).append(measure(argv, cpus=args.cpus or None, env=env,
                                                         log=work / f"{case.replace('/', '-')}.log"))
                if case in ("grpo/alignkit", "ppo/alignkit"):
                    step_times.setdefault(case.split("/")[0], []).extend(step_seconds(work, case.split("/")[0]))
        steps = {method: statistics.median(times) for method, times in step_times.items() if times}
        # vLLM vs HF generate is GRPO's rollout: benched with it, never in --quick
        generate = None if args.quick or "grpo" not in args.methods else generate_bench(args.out_dir / "rollout.json",
                                                          "bfloat16" if s["bf16"] else "float32", work / "rollout.log")
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "repeats": repeats,
                       "cpus": args.cpus, "nproc": os.cpu_count(), **s, "model": s["model"] if not args.quick
                       else "tiny random Llama, vocab 49152"},
              "runs": runs, "step_s": steps, "generate": generate}
    result["ratios"] = summarise(runs, steps, generate)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out_dir / f"{name}.md").write_text(f"# {name} ({result['meta']['date']})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
