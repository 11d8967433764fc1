"""PPO (alignment/stages/ppo.py): the checklist's toy task learns through the loop functions (and a
sign-flipped negative control does not), the first-minibatch / zero-KL invariants hold, a resumed loop
repeats an uninterrupted one, and `sft -> rm -> ppo` runs through the CLI with LoRA, killed and resumed,
with HF and with vLLM rollouts (weights synced after every update)."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignment.algos import RolloutBatch
from alignment.metrics import describe
from alignment.recipe import RecipeError
from alignment.validate import load_recipe
from alignment.rollout import HFEngine, SamplingConfig
from alignment.stages import ppo
from alignment.stages.ppo import PPOConfig, PPOTrainer, Roles, disable_dropout, new_value_head
from tests.helpers import manifest, metrics, pair_rows, run_cli, sum_rows, write_jsonl, write_recipe



@pytest.fixture(autouse=True)
def one_thread():
    """The toy models are tiny: on a shared 2-core machine one thread is ~8x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the checklist's toy task (b)

PAD, EOS, BOS, SEVEN = 0, 1, 2, 7


class ToyTokenizer:
    """What HFEngine reads from a tokenizer: ids 0 pad, 1 EOS, 2 BOS; a token is its id."""

    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i < 3))


def toy_model(seed: int, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, attention_dropout=attention_dropout)
    return LlamaForCausalLM(config)


def toy_prompts(update: int, n: int = 32) -> list[list[int]]:
    """BOS + 2-6 random ids from 3..31, a function of the update index."""
    rng = random.Random(update)
    return [[BOS] + [rng.randint(3, 31) for _ in range(rng.randint(2, 6))] for _ in range(n)]


def share_of_sevens(completions):
    """Reward: response tokens equal to 7 (up to EOS) / 8; ~1/32 for the random model."""
    scores = [c.completion_ids.count(SEVEN) / 8 for c in completions]
    return scores, {"sevens": scores}


TOY = dict(learning_rate=3e-4, lr_scheduler_type="constant", max_steps=20, per_device_train_batch_size=16,
           num_ppo_epochs=4, num_mini_batches=2, kl_coef=0.01, missing_eos_penalty=None, gamma=1.0, gae_lambda=0.95,
           clip_eps_value=0.2, vf_coef=0.1)


def toy_critic(model: LlamaForCausalLM) -> LlamaForSequenceClassification:
    """A separate critic: a copy of the policy's trunk with a zero one-output head."""
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    critic = LlamaForSequenceClassification(config)
    critic.model.load_state_dict(model.model.state_dict())
    torch.nn.init.zeros_(critic.score.weight)
    return critic


def toy_trainer(seed: int = 0, *, lora: bool = False, dropout: float = 0.0, critic: str = "value_head",
                **overrides) -> PPOTrainer:
    """Random Llama (vocab 32), reference = a frozen copy (or the adapter disabled), zero value head (or
    a separate critic), one AdamW over policy + critic; B=32, L=8, T=1, constant LR as measured
    (checklist (b)). `dropout` is set in the attention and LoRA configs, for `disable_dropout` to turn off."""
    model = toy_model(seed, attention_dropout=dropout)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    separate = toy_critic(model) if critic == "separate" else None
    if lora:
        from peft import LoraConfig, get_peft_model

        model, reference = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                            target_modules="all-linear")), None
    disable_dropout(model)
    model.train()
    roles = Roles(policy=model, reference=reference, critic=separate,
                  value_head=new_value_head(model) if separate is None else None)
    engine = HFEngine("unused", tokenizer=ToyTokenizer(), model=model)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, n=1)
    return PPOTrainer(roles, engine, PPOConfig(**{**TOY, **overrides}), sampling, stop_id=EOS, pad_id=PAD)


def reward_curve(trainer: PPOTrainer, updates: int = 20) -> list[float]:
    return [trainer.step(toy_prompts(u), share_of_sevens).metrics["reward/mean"] for u in range(updates)]


@pytest.mark.parametrize("critic,bf16", [("value_head", False), ("separate", False), ("value_head", True)],
                         ids=["value_head", "separate", "value_head-bf16"])
def test_toy_task_learns_to_say_seven(critic, bf16):
    trainer = toy_trainer(seed=0, critic=critic, bf16=bf16)
    curve = reward_curve(trainer)
    start, end = sum(curve[:3]) / 3, sum(curve[15:]) / 5
    # checklist (3 seeds): 0.023-0.035 -> 0.63-0.67; here seeds 0/1/2: 0.03-0.04 -> 0.63-0.73 (value head),
    # 0.03-0.04 -> 0.62-0.71 (separate critic)
    assert end >= 0.3 and end >= 5 * start, curve
    batch, _, _ = first_rollout(trainer, 0)
    assert batch.values.dtype == batch.old_logprobs.dtype == torch.float32  # bf16 autocast: GAE inputs stay fp32


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_critic_warmup_trains_the_critic_alone(critic):
    """critic_warmup: 2 -> updates 1-2 train the critic and leave the policy untouched (value gradients
    stop at a value head); update 3 moves the policy."""
    trainer = toy_trainer(seed=3, critic=critic, critic_warmup=2)
    value_module = trainer.roles.value_head if critic == "value_head" else trainer.roles.critic
    policy = [p.detach().clone() for p in trainer.roles.policy.parameters()]
    value = [p.detach().clone() for p in value_module.parameters()]
    for u in range(2):
        trainer.step(toy_prompts(u), share_of_sevens)
    assert all(torch.equal(a, b) for a, b in zip(policy, trainer.roles.policy.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(value, value_module.parameters()))
    trainer.step(toy_prompts(2), share_of_sevens)
    assert not all(torch.equal(a, b) for a, b in zip(policy, trainer.roles.policy.parameters()))


def test_sign_flipped_advantages_unlearn(monkeypatch):
    """Negative control: the same run with every advantage negated ends below its start."""
    gae = ppo.compute_gae

    def flipped(*args, **kwargs):
        advantages, returns = gae(*args, **kwargs)
        return -advantages, returns

    monkeypatch.setattr(ppo, "compute_gae", flipped)
    curve = reward_curve(toy_trainer(seed=0))
    assert sum(curve[15:]) / 5 < sum(curve[:3]) / 3, curve


# ------------------------------------------------------------------ invariants (checklist (a) 15)


def first_rollout(trainer: PPOTrainer, update: int):
    completions, batch, extra = trainer.generate(toy_prompts(update))
    scores, _, _ = trainer.score(completions, share_of_sevens, extra["has_stop"])
    batch, stats = trainer.advantages(trainer.forward(batch), scores)
    return batch, extra, stats


@pytest.mark.parametrize("reference", ["frozen_copy", "lora_disabled"])
def test_kl_to_the_start_policy_is_zero_and_engine_logprobs_match(reference):
    trainer = toy_trainer(seed=1, lora=reference == "lora_disabled", dropout=0.1)
    batch, extra, stats = first_rollout(trainer, 0)
    mask = batch.response_mask
    # the HF engine's sampling log-probs on a left-padded batch = the trainer's forward (measured 2.4e-7)
    assert ((extra["engine_logprobs"] - batch.old_logprobs).abs() * mask).max() < 1e-5
    # policy == reference (a copy, or a fresh adapter disabled): per-token KL 0
    assert torch.allclose(batch.old_logprobs * mask, batch.ref_logprobs * mask, atol=1e-6)
    assert abs(stats["kl/ref"]) < 1e-5


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_minibatch_ratio_is_one_with_dropout_turned_off(lora):
    """Attention (and LoRA) dropout 0.1 in the configs; after one update (a trained, non-zero adapter),
    the first minibatch of the next rollout has ratio 1, approxkl and clipfrac 0."""
    trainer = toy_trainer(seed=1, lora=lora, dropout=0.1)
    trainer.step(toy_prompts(0), share_of_sevens)
    batch, _, stats = first_rollout(trainer, 1)
    assert stats["kl/ref"] != 0  # the policy has moved
    first = batch.select(slice(0, 16))
    _, m = trainer.minibatch_loss(first, first.response_mask.sum())
    assert abs(m["policy/ratio_mean"].item() - 1) < 1e-5
    assert m["policy/approxkl"].item() < 1e-10 and m["policy/clipfrac"].item() == 0
    assert m["value/clipfrac"].item() == 0  # values equal the rollout's: nothing to clip


def grouped_batch(n: int = 3) -> RolloutBatch:
    """n responses to each of 3 left-padded prompts of 6, 3 and 4 tokens (Q = 6), responses of T = 6 (one row
    stops early: its tail is padding)."""
    gen = torch.Generator().manual_seed(4)
    q_len, t_len, lengths = 6, 6, [6, 3, 4]
    size = n * len(lengths)
    query_ids = torch.full((size, q_len), PAD)
    query_mask = torch.zeros((size, q_len), dtype=torch.bool)
    for k, length in enumerate(lengths):
        query_ids[k * n:(k + 1) * n, q_len - length:] = torch.randint(3, 32, (length,), generator=gen)
        query_mask[k * n:(k + 1) * n, q_len - length:] = True
    response_ids = torch.randint(3, 32, (size, t_len), generator=gen)
    response_mask = torch.ones((size, t_len), dtype=torch.bool)
    response_ids[1, 3], response_ids[1, 4:], response_mask[1, 4:] = EOS, PAD, False
    return RolloutBatch(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                        response_mask=response_mask, old_logprobs=torch.zeros(size, t_len), scores=torch.zeros(size))


class Wrapped(torch.nn.Module):
    """Stands in for DDP: a `.module` around the model, whose reducer wants one forward per backward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def toy_moe(seed: int):
    """A Mixtral of 4 experts, 2 a token, whose config asks for the load-balancing loss (as MoE training configs do)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS))


@pytest.mark.parametrize("role", ["policy", "critic", "wrapped", "moe"])
def test_a_shared_prompt_runs_once_with_the_same_results_and_gradients(role):
    """3 prompts x 3 responses: with `share_prefix` the trunk embeds the 3 prompts once, then the 9 responses
    against their repeated cache; log-probs, entropies, values and gradients equal the full pass's. Under a DDP
    wrapper with grad, the full pass. An MoE policy whose config asks for router logits shares too."""
    torch.manual_seed(0)
    model = toy_moe(0) if role == "moe" else toy_model(0)
    batch, weights = grouped_batch(), torch.randn(9, 6)
    if role == "critic":
        model = toy_critic(model)
        torch.nn.init.normal_(model.score.weight)
    head = new_value_head(model)
    torch.nn.init.normal_(head.weight)
    trunk = model.model
    runner = Wrapped(model) if role == "wrapped" else model
    widths = []
    trunk.embed_tokens.register_forward_hook(lambda _m, args, _out: widths.append(tuple(args[0].shape)))

    def run(share_prefix):
        model.zero_grad()
        widths.clear()
        if role == "critic":
            outputs = (ppo.critic_forward(runner, batch, share_prefix=share_prefix),)
        else:
            outputs = ppo.policy_forward(runner, batch, 0.7, value_head=head, entropy=True, share_prefix=share_prefix)
        sum(((o * weights).sum() for o in outputs)).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return [o.detach() for o in outputs], grads, list(widths)

    full, full_grads, full_widths = run(False)
    shared, shared_grads, shared_widths = run(True)
    assert full_widths == [(9, 12)]
    assert shared_widths == ([(9, 12)] if role == "wrapped" else [(3, 6), (9, 6)])
    for got, want in zip(shared, full, strict=True):
        assert (got - want).abs().max() < 1e-5
    assert len(shared_grads) == len(full_grads) == len(list(model.parameters()))
    for got, want in zip(shared_grads, full_grads, strict=True):
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-7
    with torch.no_grad():  # no grad: no reducer to upset, so the wrapped model shares too
        widths.clear()
        ppo.policy_forward(runner, batch, 0.7) if role != "critic" else ppo.critic_forward(runner, batch)
        assert widths == [(3, 6), (9, 6)]


def test_resumed_loop_repeats_the_uninterrupted_one(tmp_path):
    """4 updates straight = 2 updates, save, a fresh trainer loads and runs 2 more (same samples, losses)."""
    straight = toy_trainer(seed=2, max_steps=4)
    expected = [straight.step(toy_prompts(u), share_of_sevens).metrics for u in range(4)]

    first = toy_trainer(seed=2, max_steps=4)
    for u in range(2):
        first.step(toy_prompts(u), share_of_sevens)
    first.save(tmp_path / "checkpoint-2")
    assert not (tmp_path / "tmp-checkpoint-2").exists()

    resumed = toy_trainer(seed=2, max_steps=4)  # the same start (= reference) model
    with torch.no_grad():  # trained weights must all come from the checkpoint
        for param in [*resumed.roles.policy.parameters(), *resumed.roles.value_head.parameters()]:
            param.add_(torch.randn_like(param))
    torch.manual_seed(123)  # and so must the RNG state
    resumed.load(tmp_path / "checkpoint-2")
    assert resumed.update == 2
    got = [resumed.step(toy_prompts(u), share_of_sevens).metrics for u in range(2, 4)]
    for want, have in zip(expected[2:], got):
        for key in ("reward/mean", "policy/loss", "value/loss", "kl/ref", "learning_rate"):
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


class _Payload:
    """Unpickling this runs `exec(code)`: what a planted checkpoint file would carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_resume_never_unpickles_code_from_the_run_directory(tmp_path):
    trainer = toy_trainer(seed=2, max_steps=2)
    trainer.step(toy_prompts(0), share_of_sevens)
    folder = tmp_path / "checkpoint-1"
    trainer.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["policy", "state.pt", "trainer_state.json", "value_head.safetensors"]
    marker = tmp_path / "pwned"
    planted = {"update": 1, "optimizer": _Payload(f"open({str(marker)!r}, 'w').write('ran')")}
    torch.save(planted, folder / "state.pt")  # torch.save pickles, so _Payload.__reduce__ is kept
    with pytest.raises(RuntimeError, match=r"state\.pt: refused to load.*never unpickles code"):
        toy_trainer(seed=2, max_steps=2).load(folder)
    assert not marker.exists()


def test_every_logged_key_is_declared_in_the_vocabulary():
    trainer = toy_trainer(seed=0, max_steps=1, dual_clip=3.0)
    logged = trainer.step(toy_prompts(0), share_of_sevens).metrics
    assert "reward/sevens/mean" in logged and "grad_norm" in logged
    assert [k for k in logged if describe(k) is None] == []


def test_config_sizes_and_updates_follow_trl_names():
    """TRL's on-policy names: per_device_train_batch_size sequences x gradient_accumulation_steps x
    num_mini_batches = one rollout; without max_steps, num_train_epochs passes over the prompts."""
    cfg = PPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_mini_batches=2,
                    num_train_epochs=2, learning_rate="1e-5")  # YAML 1.1 reads 1e-5 as a string
    assert cfg.learning_rate == 1e-5 and cfg.rollout_size == 24
    assert cfg.num_updates(num_prompts=30, num_generations=2) == 5  # 2 x 30 prompts / 12 per rollout
    assert PPOConfig(max_steps=7).num_updates(num_prompts=30, num_generations=2) == 7
    with pytest.raises(ValueError, match="the rollout holds 32 sequences; .* = 24"):
        toy_trainer(per_device_train_batch_size=4, gradient_accumulation_steps=3).step(toy_prompts(0), share_of_sevens)


def test_bad_args_are_recipe_errors_with_file_and_line(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say 1:"}])
    stages = {"ppo": {"method": "ppo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
                      "rollout": {"num_generations": 3},
                      "args": {"per_device_train_batch_size": 8, "gamma": 2, "critic": "both",
                               "kl_estimator": "k4", "num_mini_batch": 2}}}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    problems = {".".join(map(str, p.path)): (p.message, p.line) for p in err.value.problems}
    lines = recipe.read_text().splitlines()
    for key, expected in [("gamma", "less than or equal to 1"), ("critic", "'value_head' or 'separate'"),
                          ("kl_estimator", "did you mean 'k3'"), ("num_mini_batch", "did you mean 'num_mini_batches'")]:
        message, line = problems[f"stages.ppo.args.{key}"]
        assert expected in message and f"{key}:" in lines[line - 1], (key, message, line)
    # a valid per_device_train_batch_size alone: 8 x 1 x 2 = 16 sequences do not split into groups of 3
    stages["ppo"]["args"] = {"per_device_train_batch_size": 8}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"prompts": {"path": "prompts.jsonl"}})
    with pytest.raises(RecipeError, match=r"args.per_device_train_batch_size: a rollout of .* = 16 sequences must "
                                          r"be divisible by rollout.num_generations \(3\)"):
        load_recipe(recipe)


# ------------------------------------------------------------------ through the CLI


def sevens(prompts, completions, **columns):
    """Share of the completion's characters that are '7'."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [t.count("7") / max(len(t), 1) for t in texts]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared 2-core machine: one thread per stage is faster
LORA = {"adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05}}  # ppo turns the dropout off


def rlhf_recipe(tmp_path, model_path):
    """sft -> rm (reward on preference pairs) -> ppo scored by the rm, all with LoRA."""
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(32))
    write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sum_rows(16, seed=1)])
    data = {"sft": {"path": "sft.jsonl"}, "pairs": {"path": "pairs.jsonl"}, "prompts": {"path": "prompts.jsonl"}}
    common = {"per_device_train_batch_size": 8, "max_steps": 4, "learning_rate": 1e-2, "save_steps": 100}
    stages = {
        "sft": {"method": "sft", "data": ["sft"], "args": common},
        "rm": {"method": "reward", "from": "sft", "data": ["pairs"], "args": common},
        "ppo": {"method": "ppo", "from": "sft", "data": ["prompts"],
                "rewards": [{"name": "reward_model", "stage": "rm"}],
                "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 8},
                "args": {"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 2,
                         "sample_steps": 2}},
    }
    return write_recipe(tmp_path, model_path, stages, data=data, model=LORA)


def test_sft_rm_ppo_runs_and_resumes_after_a_kill(tmp_path, tiny_model_path, capfd):
    recipe, runs = rlhf_recipe(tmp_path, tiny_model_path), tmp_path / "runs"
    run_dir = runs / "t"
    res = run_cli(recipe, "--run-dir", runs, "--stage", "rm", env=ONE_THREAD)  # sft, rm first: the kill is for ppo
    assert res.exit_code == 0, res.output

    res = run_cli(recipe, "--run-dir", runs, env={**ONE_THREAD, "ALIGNKIT_FAULT_KILL_AFTER_SAVE": "2"})
    assert res.exit_code == 1 and manifest(run_dir, "ppo")["status"] == "failed", res.output
    assert (run_dir / "ppo" / "checkpoints" / "checkpoint-2" / "policy" / "adapter_model.safetensors").exists()
    assert not (run_dir / "ppo" / "model").exists()

    res = run_cli(recipe, "--run-dir", runs, env=ONE_THREAD)
    assert res.exit_code == 0, res.output
    assert "resuming ppo" in res.output
    assert "sample at update 4 (reward" in capfd.readouterr().out  # the stage's own stdout
    for name in ("sft", "rm", "ppo"):
        assert manifest(run_dir, name)["status"] == "done"
    man = manifest(run_dir, "ppo")
    assert man["resumed"] is True and man["info"]["rollout_backend"] == "hf"
    rows = metrics(run_dir, "ppo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each update logged once across the two runs
    for row in rows:
        for key in ("reward/mean", "reward/reward_model/mean", "kl/ref", "policy/loss", "policy/clipfrac",
                    "policy/entropy", "policy/approxkl", "value/loss", "value/explained_var", "value/clipfrac",
                    "adv/mean", "response/length_mean", "response/truncated_frac", "rollout/logprob_diff",
                    "rollout/tokens_per_sec", "timing/generate", "timing/train", "learning_rate"):
            assert key in row, key
        assert row["rollout/logprob_diff"] < 1e-4  # hf generates with the live policy
    assert rows[0]["kl/ref"] == pytest.approx(0, abs=1e-5)  # fresh adapter: policy == reference
    meta = json.loads((run_dir / "ppo" / "model" / "alignkit_model.json").read_text())
    assert meta == {"kind": "adapter", "base": "../../sft/merged", "head": "causal_lm"}


@pytest.mark.vllm
def test_ppo_with_vllm_rollouts_syncs_weights(tmp_path, tiny_model_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(8)])
    stages = {"ppo": {
        "method": "ppo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
        "rollout": {"backend": "vllm", "num_generations": 2, "max_new_tokens": 8},
        # a high LR moves the policy far each update: without a sync the gap would be large
        "args": {"learning_rate": 1e-2, "max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 100},
    }}
    recipe = write_recipe(tmp_path, tiny_model_path, stages, data={"prompts": {"path": "prompts.jsonl"}},
                          model={"adapter": {**LORA["adapter"], "dropout": 0.0}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs", env=ONE_THREAD)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    assert manifest(run_dir, "ppo")["info"]["rollout_backend"] == "vllm"
    rows = metrics(run_dir, "ppo")
    assert len(rows) == 3
    # the policy moves (KL 0.36 nats by update 3, ~0.05 per token) while vLLM's log-probs follow the
    # trainer's (measured 1-2e-7 in fp32); a missed sync would leave a gap of the size of that move
    assert rows[-1]["kl/ref"] > 0.1
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows), [r["rollout/logprob_diff"] for r in rows]


def ppo_only(tmp_path, model_path, args: dict, model: dict | None = None):
    """A recipe with one ppo stage from the base model, rewarded for '7's, hf rollouts; run it."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(8)])
    stages = {"ppo": {
        "method": "ppo", "data": ["prompts"], "rewards": [{"name": "tests.stages.test_ppo.sevens"}],
        "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 8},
        "args": {"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 1, **args},
    }}
    recipe = write_recipe(tmp_path, model_path, stages, data={"prompts": {"path": "prompts.jsonl"}},
                          **({"model": model} if model else {}))
    res = run_cli(recipe, "--run-dir", tmp_path / "runs", env=ONE_THREAD)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "t"
    rows = metrics(run_dir, "ppo")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl/ref"] == pytest.approx(0, abs=1e-5)
    return run_dir


def test_full_fine_tuning_with_a_separate_critic(tmp_path, tiny_model_path):
    """No adapter (the reference is a frozen copy), critic: separate (from the policy, zero head); TRL's
    per_device_train_batch_size: 8 sequences x 2 minibatches = 8 prompts x 2 completions per update."""
    run_dir = ppo_only(tmp_path, tiny_model_path, {"critic": "separate", "critic_learning_rate": 1e-3,
                                                   "per_device_train_batch_size": 8})
    assert (run_dir / "ppo" / "checkpoints" / "checkpoint-1" / "critic" / "model.safetensors").exists()
    assert (run_dir / "ppo" / "model" / "model.safetensors").exists()
    assert json.loads((run_dir / "ppo" / "model" / "alignkit_model.json").read_text())["kind"] == "full"


def test_qlora(tmp_path, tiny_model_path):
    """4-bit base + LoRA: the reference is the quantized base with the adapter disabled; minibatches of
    2 micro-batches x 2 sequences."""
    run_dir = ppo_only(tmp_path, tiny_model_path, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                       model={**LORA, "quantization": {"bits": 4}})
    assert (run_dir / "ppo" / "model" / "adapter_model.safetensors").exists()


def test_a_reward_that_returns_nan_is_counted_and_does_not_poison_the_update(tmp_path, tiny_model_path):
    """Shared case 10: NaN scores become None (0 in the total), are logged per update as
    `reward/<fn>/missing`, and the policy stays finite."""
    (tmp_path / "flaky.py").write_text(
        "def every_third_nan(prompts, completions, **kw):\n"
        "    return [float('nan') if i % 3 == 0 else 1.0 for i in range(len(completions))]\n")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1="} for i in range(8)])
    recipe = write_recipe(tmp_path, tiny_model_path, {"ppo": {
        "method": "ppo", "data": ["prompts"], "rewards": [{"name": "flaky.every_third_nan"}],
        "rollout": {"backend": "hf", "num_generations": 2, "max_new_tokens": 4},
        "args": {"max_steps": 2, "per_device_train_batch_size": 8, "num_mini_batches": 1, "num_ppo_epochs": 1,
                 "learning_rate": 1.0e-3}}},
        data={"prompts": {"path": "prompts.jsonl"}}, model={"adapter": {"method": "lora", "r": 4, "dropout": 0.0}})
    res = run_cli(recipe, "--run-dir", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    rows = metrics(tmp_path / "runs" / "t", "ppo")
    assert [r["reward/flaky.every_third_nan/missing"] for r in rows] == [3, 3]  # 8 scores per update (4 prompts x 2): i = 0, 3, 6
    assert all(math.isfinite(r["policy/loss"]) and math.isfinite(r["reward/mean"]) for r in rows)
