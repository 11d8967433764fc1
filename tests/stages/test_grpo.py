"""GRPO on the tiny model: reward rises on a toy task (emit the character '7'), with HF and with
vLLM rollouts (the policy's weights are synced into vLLM after every step)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from alignment.cli import _headline
from tests.helpers import metrics, run_cli, write_jsonl, write_recipe


def sevens(prompts, completions, **columns):
    """Share of the completion's characters that are '7' (a reward a random model finds)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


def grpo_recipe(tmp_path, model_path, backend):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(16)])
    stages = {"grpo": {
        "method": "grpo", "data": ["prompts"],
        "rewards": [{"name": "tests.stages.test_grpo.sevens"}],
        "rollout": {"backend": backend, "num_generations": 8, "max_new_tokens": 8, "temperature": 1.0},
        "args": {"learning_rate": 1.0e-2, "max_steps": 12, "save_steps": 100, "beta": 0.0},
    }}
    return write_recipe(tmp_path, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})


def reward_curve(run_dir):
    return [m["reward/mean"] for m in metrics(run_dir, "grpo") if "reward/mean" in m]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_grpo_raises_reward(tmp_path, tiny_model_path, backend):
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    recipe = grpo_recipe(tmp_path, tiny_model_path, backend)
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    curve = reward_curve(run_dir)
    assert len(curve) == 12
    # TRL's keys arrive renamed to the vocabulary's (alignment/metrics.py), as ppo logs them
    row = metrics(run_dir, "grpo")[0]
    sevens = "tests.stages.test_grpo.sevens"  # TRL names a reward by its __name__: the recipe's name
    for ours, trl in [("reward/std", "reward_std"), (f"reward/{sevens}/mean", f"rewards/{sevens}/mean"),
                      ("response/length_mean", "completions/mean_length"), ("timing/step", "step_time")]:
        assert ours in row and trl not in row, (ours, sorted(row))
    assert sum(curve[-3:]) / 3 > 2 * sum(curve[:3]) / 3 + 0.02, curve
    man = json.loads((run_dir / "grpo" / "manifest.json").read_text())
    assert man["info"]["rollout_backend"] == backend
    # the quarters the summary prints come from the same log
    assert man["metrics"]["reward/first_quarter"] == pytest.approx(sum(curve[:3]) / 3)
    assert man["metrics"]["reward/last_quarter"] == pytest.approx(sum(curve[-3:]) / 3)
    first, last = man["metrics"]["reward/first_quarter"], man["metrics"]["reward/last_quarter"]
    assert _headline(man["metrics"]) == f"reward {first:.3g} → {last:.3g}" and "summary" in res.output


def test_a_reward_that_loses_every_score_stops_the_stage_naming_it(tmp_path, tiny_model_path):
    """Issue 16, kind 4: a reward returning NaN for every completion used to let GRPO finish 'done' with loss 0,
    having trained on nothing; now the stage stops after `max_missing_reward_steps` such steps, exit 2."""
    (tmp_path / "broken.py").write_text("def always_nan(prompts, completions, **kw):\n"
                                        "    return [float('nan')] * len(completions)\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}"} for i in range(8)])
    recipe = write_recipe(tmp_path, tiny_model_path, {"grpo": {
        "method": "grpo", "data": ["prompts"], "rewards": [{"name": "broken.always_nan"}], "max_missing_reward_steps": 2,
        "rollout": {"backend": "hf", "num_generations": 4, "max_new_tokens": 4},
        "args": {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 1, "beta": 0.0}}},
        data={"prompts": {"path": "prompts.jsonl"}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 2, res.output
    assert ("stage 'grpo' stopped: every reward ('broken.always_nan') lost every score for 2 steps in a row, "
            "up to step 2") in res.output
    assert "resume" not in res.output and "Traceback" not in res.output
    run_dir = tmp_path / "runs" / "t"
    man = json.loads((run_dir / "grpo" / "manifest.json").read_text())
    assert man["status"] == "failed" and man["exit_code"] == 2
    assert (run_dir / "grpo" / "checkpoints" / "checkpoint-1").is_dir()  # the last checkpoint is kept


def _trainer(tiny_model_path, tmp_path, mixins=None, **args):
    """A GRPOTrainer over the tiny model in float64 (the comparisons below are then free of float32's rounding,
    which the +/- advantages of a group cancel into) with our `mixins` (default: the zero-advantage one);
    `_compute_loss` only."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignment.stages.grpo import SkipZeroAdvantageRows

    config = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=6, report_to=[], use_cpu=True, **args)
    cls = type("GRPOTrainer", (*((SkipZeroAdvantageRows,) if mixins is None else mixins), GRPOTrainer), {})
    return cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64), reward_funcs=[sevens], args=config,
               train_dataset=Dataset.from_list([{"prompt": "say 1"}] * 8),
               processing_class=AutoTokenizer.from_pretrained(tiny_model_path))


def _batch(rows=8, prompt=5, completion=6, vocab=100):
    import torch

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(rows, completion, dtype=torch.long)
    mask[1, 4:] = 0  # one short completion
    # two groups of 4: the first scored all alike (advantage 0), the second not
    advantages = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.2, -0.4, -0.4, -0.4])
    return {"prompt_ids": torch.randint(3, vocab, (rows, prompt), generator=g),
            "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
            "completion_ids": torch.randint(3, vocab, (rows, completion), generator=g), "completion_mask": mask,
            "advantages": advantages, "num_items_in_batch": mask.sum()}


def _loss_grads_rows(trainer, inputs):
    """The loss, its gradients and the rows the policy forward saw."""
    seen = []
    forward = trainer._get_per_token_logps_and_entropies

    def counting(model, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        return forward(model, input_ids, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = counting
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    trainer._get_per_token_logps_and_entropies = forward
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return loss.detach(), grads, seen


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_zero_advantage_rows_skip_the_forward_with_the_same_loss_and_gradient(tmp_path, tiny_model_path, loss_type):
    from alignment.stages.grpo import SkipZeroAdvantageRows

    trainer = _trainer(tiny_model_path, tmp_path, loss_type=loss_type, beta=0.0)
    skipped = _loss_grads_rows(trainer, _batch())
    trainer._rows_skippable = lambda inputs: False  # TRL's own computation, every row
    every = _loss_grads_rows(trainer, _batch())
    assert skipped[2] == [4] and every[2] == [8]  # half the rows, as half had advantage 0
    # the loss is a difference of terms ~5000x its size (a group's advantages sum to 0): 1e-5 relative is rounding
    assert float(skipped[0]) == pytest.approx(float(every[0]), rel=1e-5)
    assert len(skipped[1]) == len(every[1]) > 0
    for a, b in zip(skipped[1], every[1]):
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()) + 1e-14
    assert trainer._metrics["train"]["zero_advantage/skipped_frac"] == [0.5]
    assert "dapo" in SkipZeroAdvantageRows.EXACT_LOSS_TYPES  # TRL's default loss


def test_zero_advantage_rows_train_where_they_move_the_loss(tmp_path, tiny_model_path):
    """A KL term (beta > 0) or a per-row normaliser (loss_type grpo) gives zero-advantage rows a gradient or a
    weight: every row trains, as in TRL. A micro-batch of zero-advantage rows alone keeps one row."""
    import torch

    for args in ({"beta": 0.1}, {"loss_type": "grpo", "beta": 0.0}):
        trainer = _trainer(tiny_model_path, tmp_path, **args)
        inputs = _batch()
        if args.get("beta"):
            inputs["ref_per_token_logps"] = torch.zeros_like(inputs["completion_mask"], dtype=torch.float)
        assert _loss_grads_rows(trainer, inputs)[2] == [8], args
    trainer = _trainer(tiny_model_path, tmp_path, beta=0.0)
    inputs = {**_batch(), "advantages": torch.zeros(8)}
    loss, grads, seen = _loss_grads_rows(trainer, inputs)
    assert seen == [1] and float(loss) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_a_groups_prompt_runs_once_with_the_same_loss_and_gradient(tmp_path, tiny_model_path, monkeypatch):
    """Two groups of 4 completions (one prompt left-padded), a KL term: with `SharePromptForward` the trunk embeds
    the 2 prompts once and the 8 completions against their repeated cache, and the LM head projects the completion
    tokens only; the loss (policy and reference log-probs) and every gradient are TRL's plain pass's."""
    import torch
    from trl.trainer import utils

    from alignment.stages.grpo import SharePromptForward

    inputs = _batch()
    prompts = inputs["prompt_ids"][[0, 4]].repeat_interleave(4, dim=0)
    mask = torch.ones_like(prompts)
    mask[4:, :2] = 0
    inputs |= {"prompt_ids": prompts.masked_fill(mask == 0, 0), "prompt_mask": mask,
               "advantages": torch.tensor([0.5, -0.5, 0.2, -0.2, 1.2, -0.4, -0.4, -0.4])}
    projected = []  # positions each call of TRL's fused LM head projects through the vocabulary

    class Counting(utils._ChunkedLogProbFunction):
        @classmethod
        def apply(cls, hidden, *args):
            projected.append(hidden.shape[0])
            return super().apply(hidden, *args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", Counting)
    results = {}
    for mixins in ((), (SharePromptForward,)):
        projected.clear()
        trainer = _trainer(tiny_model_path, tmp_path, mixins=mixins, beta=0.1)
        with torch.no_grad():  # the reference pass, as `_generate_and_score_completions` makes it
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            both = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            ref = trainer._get_per_token_logps_and_entropies(trainer.model, ids, both, 6)[0] - 0.05
        widths = []
        trainer.model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _out: widths.append(tuple(args[0].shape)))
        loss, grads, _ = _loss_grads_rows(trainer, {**inputs, "ref_per_token_logps": ref})
        assert "forward" not in trainer.model.base_model.__dict__  # the decoder's own forward again
        results[bool(mixins)] = loss, grads, widths, ref, list(projected)
    (plain_loss, plain_grads, plain_widths, plain_ref, plain_projected), (loss, grads, widths, ref, projected) = \
        results[False], results[True]
    assert plain_widths == [(8, 11)] and widths == [(2, 5), (8, 6)]
    # reference pass, then the policy's: every position on CPU in TRL's, the 46 completion tokens in ours
    assert plain_projected == [8 * 10] * 2 and projected == [int(inputs["completion_mask"].sum())] * 2
    assert float((ref - plain_ref).abs().max()) < 1e-6
    assert float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
    assert len(grads) == len(plain_grads) > 0
    for a, b in zip(grads, plain_grads):  # TRL's fused LM head rounds through float32: ~1e-7 apart, not 1e-15
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()) + 1e-14


def test_trl_log_prob_seam_is_where_the_prompt_sharing_plugs_in():
    """`SharePromptForward` overrides TRL 1.16's `_get_per_token_logps_and_entropies` of GRPO and RLOO and passes
    its first arguments on by position: they must stay these, and TRL's fused LM head must call the decoder as
    `base_model` (what `shared_prompt_backbone` wraps)."""
    import inspect

    from trl import GRPOTrainer, RLOOTrainer
    from trl.trainer import utils

    for cls in (GRPOTrainer, RLOOTrainer):
        names = list(inspect.signature(cls._get_per_token_logps_and_entropies).parameters)[:8]
        assert names == ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                         "compute_entropy", "compute_aux_loss"], cls
    assert 'backbone_attr = "base_model"' in inspect.getsource(utils.add_fused_lm_head)
