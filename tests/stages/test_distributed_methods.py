"""Every other method on two processes (gloo on CPU, `launch: {num_processes: 2}` under `torch.distributed.run`),
beside tests/stages/test_distributed.py's SFT, DPO and GRPO and test_ppo_distributed.py's PPO. With the same global
batch, a deterministic method (reward, KTO, ORPO, CPO, SimPO, distill with lmbda 0) trains the 1-process curve; a
sampling one (online DPO, RLOO, distill with lmbda > 0) consumes the same rows per step, scores the same prompts and
still trains; either way rank 0 alone writes the artifact, result.json and one metrics line per step.

Each test is two short runs of the tiny model (this 2-core machine runs CI): reward in the fast suite, the rest `slow`
(`pytest -m slow tests/stages/test_distributed_methods.py`).
"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import losses, pair_rows, sum_rows
from tests.stages.test_distill import _teacher
from tests.stages.test_distributed import LOSS_RTOL, assert_one_writer, two_ways
from tests.stages.test_methods_preference import LORA, MODELS, pairs

STEPS = 3


def args(n: int, **more) -> dict:
    """Global batch 8 rows both ways: 1 process x 4 rows x 2 accumulation steps, 2 processes x 4 rows x 1."""
    return {"learning_rate": 1e-2, "max_steps": STEPS, "save_steps": 100, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2 // n, **more}


def unpaired(rows: list[dict]) -> list[dict]:
    """KTO's rows: each pair as a desirable (chosen) and an undesirable (rejected) completion."""
    return [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in rows for side in ("chosen", "rejected")]


def distill(lmbda: float):
    """The distill stage over `_teacher` (test_distill's wider, sharpened tiny Llama) in the test's folder."""
    return lambda n, tmp: {"method": "distill", "teacher": str(tmp / "teacher"), "data": ["sft"],
                           "args": args(n, lmbda=lmbda, beta=0.5, max_new_tokens=6)}


# method -> (stage for n processes, datasets, the method's own objective, compared besides loss and grad_norm)
DETERMINISTIC = {
    "reward": (lambda n, tmp: {"method": "reward", "data": ["pairs"], "args": args(n)},
               lambda: {"pairs": pair_rows(32)}, "margin"),
    "kto": (lambda n, tmp: {"method": "kto", "data": ["kto_rows"], "args": args(n, beta=0.1)},
            lambda: {"kto_rows": unpaired(pair_rows(16))}, "rewards/margins"),
    # test_methods_preference's models: ORPO with LoRA, CPO with DoRA, SimPO with QLoRA (nf4 on CPU)
    **{m: (lambda n, tmp, m=m: {"method": m, "data": ["pairs"], "args": args(n, beta=0.1),
                                "model": {"adapter": LORA, **MODELS[m]}},
           lambda: {"pairs": pairs(32)}, "rewards/margins") for m in ("orpo", "cpo", "simpo")},
    # lmbda 0: every batch is the dataset's completions, none sampled
    "distill": (distill(0.0), lambda: {"sft": sum_rows(32)}, "loss"),
}


@pytest.mark.parametrize("method", [
    "reward",  # the fast suite's one: one model (a scalar head), no reference, no sampling
    *(pytest.param(m, marks=pytest.mark.slow) for m in DETERMINISTIC if m != "reward"),
])
def test_two_processes_train_the_one_process_curve(tmp_path, tiny_model_path, method):
    """Measured (float32, 3 steps at LR 1e-2): loss, grad_norm and objective equal to the last bit for reward, ORPO,
    CPO, SimPO and distill, within 4e-6 relative for KTO (summation order, as for SFT and DPO): LOSS_RTOL (1e-4)
    holds them all, while a missing or doubled process factor (TRL 1.16's GKD halved its loss and gradient on
    2 processes: `DistillTrainer`) is off by 50 %."""
    stage, data, objective = DETERMINISTIC[method]
    if method == "distill":
        _teacher(tmp_path / "teacher")
    one, two = two_ways(tmp_path, tiny_model_path, lambda n: {method: stage(n, tmp_path)}, data=data())
    assert_one_writer(two, method, STEPS)
    for key in dict.fromkeys(("loss", "grad_norm", objective)):
        curve = losses(one, method, key)
        assert len(curve) == STEPS, (key, curve)
        assert losses(two, method, key) == pytest.approx(curve, rel=LOSS_RTOL, abs=1e-6), key
    curve = losses(one, method, objective)
    assert curve[-1] != pytest.approx(curve[0], rel=1e-3, abs=1e-4), curve  # it trained: not a constant compared


def logged_lowercase(prompts, completions, trainer_state=None, **columns):
    """online DPO's judge (test_methods_online_dpo's `lowercase`), recording each (step, prompt) it scores as
    test_distributed's `sevens` does."""
    from tests.stages.test_distributed import sevens
    from tests.stages.test_methods_online_dpo import lowercase

    sevens(prompts, completions, trainer_state)
    return lowercase(prompts, completions)


def chat_prompts(n: int = 16) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(n)]


# method -> (stage for n processes, datasets, completions scored per step (None: no reward), a key that must rise
# over the 2-process run (-key: fall)). Global batch: 8 prompts x 2 completions (online DPO), 2 prompts x 8
# completions (RLOO), 8 rows (distill).
SAMPLING = {
    "online_dpo": (lambda n, tmp: {
        "method": "online_dpo", "data": ["prompts"], "rewards": [{"name": f"{__name__}.logged_lowercase"}],
        "rollout": {"max_new_tokens": 8, "temperature": 1.0}, "args": args(n, beta=0.1)},
        lambda: {"prompts": chat_prompts()}, 16, "kl/ref"),  # the policy leaves its reference
    "rloo": (lambda n, tmp: {
        "method": "rloo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_distributed.sevens"}],
        "rollout": {"backend": "hf", "num_generations": 8, "max_new_tokens": 8, "temperature": 1.0},
        "args": args(n, beta=0.0, per_device_train_batch_size=8)},
        lambda: {"prompts": chat_prompts()}, 16, "reward/mean"),  # RLOO's loss is ~0 on-policy: the reward
    "distill": (distill(0.5), lambda: {"sft": sum_rows(32)}, None, "-loss"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SAMPLING))
def test_sampling_methods_keep_the_global_batch_on_two_processes(tmp_path, tiny_model_path, method):
    """Curves cannot match here: online DPO's one process samples all 8 prompts' completions from one RNG stream,
    two ranks 4 prompts' each from streams of their own; RLOO seeds each rank's
    generation apart (TRL's device-specific seed); GKD decides on-policy per micro-batch with `random.random()`,
    drawn twice a step by one process (2 accumulation steps) and once by each of two ranks, so other steps sample.
    What must hold: the same rows per step (`epoch` after each step), the same prompts scored at each step, one
    writer, and the objective moving on this fixed seed."""
    stage, data, per_step, rising = SAMPLING[method]
    if method == "distill":
        _teacher(tmp_path / "teacher")
    one, two = two_ways(tmp_path, tiny_model_path, lambda n: {method: stage(n, tmp_path)}, data=data())
    assert_one_writer(two, method, STEPS)
    assert losses(two, method, "epoch") == losses(one, method, "epoch")  # rows consumed after each step
    if per_step:
        scored = [Counter(tuple(json.loads(line)) for line in (tmp_path / f"n{n}" / "scored.jsonl").read_text().splitlines())
                  for n in (1, 2)]
        assert scored[0] == scored[1] and sum(scored[0].values()) == STEPS * per_step, scored
    sign, key = (-1, rising[1:]) if rising.startswith("-") else (1, rising)
    curve = losses(two, method, key)
    assert len(curve) == STEPS and sign * (curve[-1] - curve[0]) > 1e-3, curve
