"""Proximal policy optimisation for RLHF, written here (TRL 1.16 has no PPO trainer).

Each update samples completions from the rollout engine, scores them with the `rewards:` list, puts a
per-token KL penalty to the reference in the reward, estimates advantages with GAE against a critic, and
takes K epochs x M minibatches of clipped policy + value steps (Schulman et al. 2017, arXiv 1707.06347;
Ziegler et al. 2019, arXiv 1909.08593; the choices follow Huang et al. 2024, "The N Implementation
Details of RLHF with PPO", as listed in shared/notes/ppo-checklist.md). On one process or on N under DDP
(`accelerate.Accelerator`): each rank rolls out its share of the prompts, statistics span the global batch.

    alignkit run recipes/quickstart/ppo.yaml --stage ppo
    python -m torch.distributed.run --nproc_per_node 2 -m alignment.stage runs/NAME ppo  # what num_processes: 2 runs
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import pydantic
import torch
from pydantic import Field

from alignment.algos import (
    KL_ESTIMATORS, AdaptiveKLController, AggMode, FixedKLController, RolloutBatch, aggregate_loss, compute_gae,
    compute_kl, compute_token_rewards, compute_value_loss, logprobs_from_hidden, masked_mean,
    masked_var, masked_whiten, ppo_clip_loss, truncate_after_stop,
)
from alignment.algos import AllReduce, masked_count
from alignment.recipe import _pydantic_problems
from alignment.registry import did_you_mean
from alignment.rollout import Completion, SamplingConfig, same_prompt_rows
from alignment.rundir import CHECKPOINT_STATE
from alignment.stages import StageContext, StageResult, effective_args, reward_trend, stage


# ---------------------------------------------------------------------------------------------- config


RANK_SEED_STRIDE = 100003  # rank r seeds its RNG streams with seed + r * this (checklist 0, TRL's PPO)
PROMPT_SEED_STRIDE = 1_000_003  # `rollout_seed_per_prompt`: prompt k of the stream samples from seed * this + k


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(extra="forbid"))
class PPOConfig:
    """The `args:` of a ppo stage, named as in TRL's on-policy trainers (its old PPOConfig and RLOOConfig, which
    count `per_device_train_batch_size` in sequences, as GRPOConfig does): in one update each of the N processes
    generates a rollout of `per_device_train_batch_size` x `gradient_accumulation_steps` x `num_mini_batches`
    sequences (its share of the global rollout, N times that: TRL's `local_batch_size` and `batch_size`), i.e.
    that over `rollout.num_generations` prompts, then takes `num_ppo_epochs` x `num_mini_batches` optimizer steps,
    each summing `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` sequences per
    process (one forward/backward each). A global minibatch is thus per_device x accumulation x N sequences:
    halving `per_device_train_batch_size` (or the accumulation) while doubling N trains the same. `max_steps`
    counts updates; unset, the stage makes `num_train_epochs` passes over the prompts.

    Raises:
        pydantic.ValidationError: a wrong type or an out-of-range value (a recipe reports it with file:line).
    """

    learning_rate: float = Field(1.0e-5, gt=0, description="policy; 3e-6 full fine-tuning at ~1B (N+), ~1e-4 LoRA")
    lr_scheduler_type: Literal["linear", "constant"] = Field(
        "linear", description="linear: decay to 0 over the updates, no warmup (N+)")
    critic_learning_rate: Optional[float] = Field(None, gt=0, description="value head / critic; None = learning_rate")
    max_steps: int = Field(-1, description="PPO updates (rollouts); <= 0: as many as num_train_epochs needs")
    num_train_epochs: float = Field(3.0, gt=0, description="passes over the prompts, when max_steps is unset")
    per_device_train_batch_size: int = Field(32, gt=0, description="sequences per forward/backward (micro-batch)")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    num_mini_batches: int = Field(2, gt=0, description="optimizer steps per pass over a rollout (TRL's name)")
    num_ppo_epochs: int = Field(4, gt=0, description="passes over each rollout (TRL, N+: 4)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (NB Policy 6)")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda (TRL, N+)")
    clip_eps_low: float = Field(0.2, gt=0, description="ratio clipped to [1 - clip_eps_low, 1 + clip_eps_high]")
    clip_eps_high: float = Field(0.2, gt=0, description="the upper clip; > low is DAPO's Clip-Higher")
    dual_clip: Optional[float] = Field(
        None, gt=1, description="c > 1 caps the loss at -c * A for A < 0 (Ye et al. 2020; verl c = 3); None = off")
    clip_eps_value: float = Field(
        0.2, gt=0, description="value clip around the rollout values (TRL, N+; 0.5 in verl, OpenRLHF)")
    vf_coef: float = Field(0.1, ge=0, description="loss = policy + vf_coef * value - entropy_coef * entropy")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus weight")
    kl_coef: float = Field(0.05, ge=0, description="beta of the in-reward KL penalty (TRL 0.05; NB 0.15 adaptive)")
    kl_estimator: str = Field("k1", description="a name in algos.KL_ESTIMATORS")
    adaptive_kl: bool = Field(False, description="move kl_coef toward target_kl (Ziegler et al. 2019, 2.2)")
    target_kl: float = Field(6.0, gt=0, description="nats per sequence (NB Policy 11)")
    horizon: int = Field(10000, gt=0, description="the adaptive controller's horizon, in sequences")
    whiten_advantages: bool = Field(True, description="normalise advantages over the rollout")
    whiten_rewards: bool = Field(False, description="N+ found it harmful; needs >= 8 sequences per rollout")
    missing_eos_penalty: Optional[float] = Field(
        1.0, ge=0, description="subtracted from the score of a completion cut at the limit; None = off")
    loss_agg_mode: AggMode = Field("token-mean", description="how per-token losses reduce (algos.aggregate_loss)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping, policy and critic together")
    adam_epsilon: float = Field(1.0e-5, gt=0, description="AdamW epsilon (N+)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    critic: Literal["value_head", "separate"] = Field(
        "value_head", description="separate: its own model, from the RM or the policy")
    critic_warmup: int = Field(
        0, ge=0, description="first N updates train the critic only (verl): a baseline before the policy moves")
    bf16: bool = Field(
        False, description="bf16 autocast for the models' forward/backward (weights, values, losses stay fp32); "
        "auto: where the device has native bf16 (alignment.models.bf16_supported)")
    save_steps: Optional[int] = Field(None, gt=0, description="checkpoint every N updates; None = a fifth of them")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept")
    logging_steps: int = Field(1, gt=0, description="write metrics every N updates")
    sample_steps: int = Field(10, gt=0, description="print one decoded completion and its reward every N updates")
    seed: Optional[int] = Field(None, description="None = the recipe's seed")
    rollout_seed_per_prompt: bool = Field(
        False, description="sample each prompt from its own seed (seed and the prompt's place in the stream): the "
                           "same rollouts at any process count or batch layout, at one generate call per prompt")

    @pydantic.field_validator("kl_estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        if name not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator '{name}'{did_you_mean(name, KL_ESTIMATORS.names())}; "
                             f"known: {', '.join(KL_ESTIMATORS.names())}")
        return name

    @property
    def rollout_size(self) -> int:
        """Sequences per rollout on each process: per_device_train_batch_size x gradient_accumulation_steps x
        num_mini_batches (the global rollout is that x the number of processes)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    def num_updates(self, num_prompts: int, num_generations: int, num_processes: int = 1) -> int:
        """`max_steps`, or the updates `num_train_epochs` passes over `num_prompts` prompts take."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * num_prompts * num_generations
                                / (self.rollout_size * num_processes)))


_MULTI_PROCESS_BACKEND = ("ppo on several processes generates on every rank with the hf engine; {!r} rollouts are "
                          "not wired across processes yet: set rollout.backend: hf, or launch.num_processes: 1")


def _check(recipe, name):
    """Recipe-time refusals: no rewards, samples not from the policy, bad args, untrainable setups."""
    from alignment.recipe import Problem

    spec, where = recipe.stages[name], ("stages", name)
    problems = []
    if not spec.rewards:
        problems.append(Problem(where + ("rewards",), "ppo needs at least one reward, e.g. rewards: "
                                "[{name: reward_model, stage: rm}]"))
    rollout = spec.rollout
    if rollout.temperature == 0:
        problems.append(Problem(where + ("rollout", "temperature"), "ppo samples: temperature must be > 0"))
    if rollout.top_k != 0 or rollout.top_p != 1:
        problems.append(Problem(where + ("rollout",), "ppo rollouts must sample from the policy itself: set "
                                "top_k: 0 and top_p: 1.0 (truncated sampling makes the KL estimate negative)"))
    known = {f.name for f in dataclasses.fields(PPOConfig)}  # unknown keys: the recipe's own args check
    try:
        cfg = PPOConfig(**{k: v for k, v in effective_args(recipe, name).items() if k in known})  # bf16: auto resolved
    except pydantic.ValidationError as err:
        problems += [dataclasses.replace(p, path=where + ("args",) + p.path) for p in _pydantic_problems(err, {})]
    else:
        if cfg.rollout_size % rollout.num_generations:
            problems.append(Problem(where + ("args", "per_device_train_batch_size"), (
                f"a rollout of per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = "
                f"{cfg.rollout_size} sequences must be divisible by rollout.num_generations "
                f"({rollout.num_generations}): whole prompts, each with all its completions")))
    model = recipe.stage_model(name)
    if model.quantization is not None and model.adapter is None:
        problems.append(Problem(where + ("model",), "quantized weights cannot be trained in full: add an "
                                "adapter (QLoRA) or drop the quantization"))
    if (recipe.stage_launch(name).num_processes or 1) > 1 and rollout.backend != "hf":
        problems.append(Problem(where + ("rollout", "backend"), _MULTI_PROCESS_BACKEND.format(rollout.backend)))
    return problems


# ---------------------------------------------------------------------------------------------- roles


@dataclass
class Roles:
    """The four PPO roles (checklist section 0); the reward is the caller's `reward_fn`.

    policy: a causal LM, or a PeftModel over one (trainable).
    reference: a frozen model; None = the policy under `disable_adapter()` (a fresh adapter only).
    value_head: Linear(hidden, 1) on the policy's last hidden state, or None.
    critic: a separate *ForSequenceClassification model (its `score` head read at every token), or None.
    """

    policy: torch.nn.Module
    reference: Optional[torch.nn.Module] = None
    value_head: Optional[torch.nn.Module] = None
    critic: Optional[torch.nn.Module] = None

    def __post_init__(self):
        if self.reference is self.policy:
            raise ValueError("the reference must be a frozen copy of the policy, not the policy itself")
        if (self.value_head is None) == (self.critic is None):
            raise ValueError("give exactly one of value_head and critic")
        if self.critic is not None and self.critic.score.out_features != 1:
            raise ValueError(f"the critic's score head must have one output, got {self.critic.score.out_features}")
        from peft import PeftModel

        if self.reference is None and not isinstance(self.policy, PeftModel):
            raise ValueError("without an adapter the reference must be a frozen copy of the policy")

    def trainable(self) -> tuple[list, list]:
        """(policy parameters, critic parameters) that require grad."""
        value = self.value_head if self.value_head is not None else self.critic
        return ([p for p in self.policy.parameters() if p.requires_grad],
                [p for p in value.parameters() if p.requires_grad])


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, LoRA's and attention's included, or the first-minibatch ratio is not 1
    (checklist section 0). Llama-style attention reads a float `attention_dropout` attribute, not a module."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def new_value_head(policy: torch.nn.Module) -> torch.nn.Linear:
    """Linear(hidden, 1), weight and bias 0 (NB Policy 2), float32, on the policy's device."""
    head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(policy.parameters()).device)


# ---------------------------------------------------------------------------------------------- forward passes


def _model_inputs(batch: RolloutBatch) -> dict:
    """query (left-padded) + response (right-padded); positions count valid tokens only (checklist 1)."""
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1).long()
    return {"input_ids": torch.cat([batch.query_ids, batch.response_ids], dim=1), "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}


def _lm_head(model):
    """hidden (N, H) -> logits (N, V) as the model's forward makes them (Gemma's logit soft-capping included).
    `model` may be the DDP wrapper `accelerator.prepare` returns: the head is read from the module inside."""
    model = getattr(model, "module", model)
    head, cap = model.get_output_embeddings(), getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return head if cap is None else (lambda hidden: cap * torch.tanh(head(hidden) / cap))


def _can_share_prefix(model) -> bool:
    """A forward in two parts (prompts with a cache, then responses) is one forward of the model's: not under a
    DDP wrapper with grad (its reducer expects one forward per backward), nor with gradient checkpointing in
    training (which turns the cache off)."""
    if not torch.is_grad_enabled():
        return True
    if hasattr(model, "module"):  # torch's DistributedDataParallel, as `accelerator.prepare` returns it
        return False
    return not (model.training and getattr(model, "is_gradient_checkpointing", False))


def response_states(model, batch: RolloutBatch, *, share_prefix: bool = True, **kwargs) -> torch.Tensor:
    """The last hidden states (B, T, H) that predict the response tokens: at the prompt's last token and at each
    response token but the last. Rows that share a prompt (the n completions of a group) run it once: the D
    distinct prompts forward with a KV cache, the cache is repeated to the B rows (`reorder_cache`, which
    gradients pass through), then the responses forward against it -- the full pass's states and gradients up
    to float rounding, for D/B of the prompt's compute (with 39-token prompts, 16-token responses and 8 rows
    a prompt, a policy forward + backward takes 4.3 s instead of 10.5 s here). The full pass where no two rows
    share a prompt, `share_prefix` is False, `_can_share_prefix` says no or the cache cannot be reordered.
    `kwargs` go to both forwards (e.g. `logits_to_keep=1`). An MoE's load-balancing loss is not asked for: PPO has
    no use for it, and a split pass could not compute it (router logits for T tokens against a (B, Q + T) mask)."""
    inputs, q_len = _model_inputs(batch), batch.query_ids.shape[1]
    if getattr(getattr(model, "module", model).config.get_text_config(), "output_router_logits", False):
        kwargs = {**kwargs, "output_router_logits": False}
    same = same_prompt_rows(batch.query_ids, batch.query_mask) if share_prefix and _can_share_prefix(model) else None
    if same is not None:
        first, inverse = same
        prompt = model(**{key: inputs[key][first, :q_len] for key in ("input_ids", "attention_mask", "position_ids")},
                       use_cache=True, output_hidden_states=True, **kwargs)
        cache = prompt.past_key_values
        if hasattr(cache, "reorder_cache"):
            cache.reorder_cache(inverse)
            out = model(input_ids=inputs["input_ids"][:, q_len:], attention_mask=inputs["attention_mask"],
                        position_ids=inputs["position_ids"][:, q_len:], past_key_values=cache, use_cache=True,
                        output_hidden_states=True, **kwargs)
            return torch.cat([prompt.hidden_states[-1][inverse, -1:], out.hidden_states[-1][:, :-1]], dim=1)
    out = model(**inputs, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1][:, q_len - 1:-1]


def policy_forward(model, batch: RolloutBatch, temperature: float, *, value_head=None, entropy: bool = False,
                   detach_trunk: bool = False, share_prefix: bool = True):
    """Log-probs of the response tokens (B, T) at `temperature`, and optionally their entropy and the value
    head's values (B, T), read at the state before each token (the logits' shifted positions).
    `detach_trunk`: value gradients stop at the head (critic warm-up leaves the policy as it is).
    `share_prefix`: a group's prompt runs once (`response_states`)."""
    # the model's own logits for one position only: the response's come from its hidden states in chunks,
    # never (B, T, V) at once (algos.logprobs_from_hidden)
    hidden = response_states(model, batch, share_prefix=share_prefix, logits_to_keep=1)
    logprobs, ent = logprobs_from_hidden(hidden, batch.response_ids, _lm_head(model), temperature, entropy=entropy)
    values = None
    if value_head is not None:
        with torch.autocast(hidden.device.type, enabled=False):  # values feed GAE: fp32 even under bf16
            hidden = hidden.float()
            values = value_head(hidden.detach() if detach_trunk else hidden).squeeze(-1)
    return logprobs, ent, values


def critic_forward(critic, batch: RolloutBatch, score: Optional[torch.nn.Module] = None, *, share_prefix: bool = True):
    """Values (B, T) of a separate critic: its sequence-classification head at every state, not pooled.
    `score`: that head, when `critic` is a DDP wrapper around the model (None: `critic.score`).
    `share_prefix`: a group's prompt runs once (`response_states`)."""
    score = critic.score if score is None else score
    hidden = response_states(critic, batch, share_prefix=share_prefix)
    with torch.autocast(hidden.device.type, enabled=False):  # values feed GAE: fp32 even under bf16
        return score(hidden.to(score.weight.dtype)).squeeze(-1).float()


def collate(completions: list[Completion], *, pad_id: int, stop_id: int, device) -> tuple[RolloutBatch, dict]:
    """Engine completions -> a RolloutBatch (old_logprobs = the engine's for now, scores 0), cut after the
    first stop token (which stays valid), plus `has_stop` (B,) and the engine's log-probs (B, T)."""
    batch_size = len(completions)
    q_len = max(len(c.prompt_ids) for c in completions)
    t_len = max(1, max(len(c.completion_ids) for c in completions))
    query_ids = torch.full((batch_size, q_len), pad_id, dtype=torch.long)
    query_mask = torch.zeros((batch_size, q_len), dtype=torch.bool)
    response_ids = torch.full((batch_size, t_len), pad_id, dtype=torch.long)
    engine_logprobs = torch.zeros((batch_size, t_len))
    lengths = torch.tensor([len(c.completion_ids) for c in completions])
    for i, c in enumerate(completions):
        if c.prompt_ids:
            query_ids[i, q_len - len(c.prompt_ids):] = torch.tensor(c.prompt_ids)
            query_mask[i, q_len - len(c.prompt_ids):] = True
        if c.completion_ids:
            response_ids[i, :len(c.completion_ids)] = torch.tensor(c.completion_ids)
            engine_logprobs[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float)
    response_ids, response_mask, has_stop = truncate_after_stop(response_ids, stop_id, pad_id)
    response_mask &= torch.arange(t_len) < lengths[:, None]  # a short row without a stop: its pads are not valid
    batch = RolloutBatch(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                         response_mask=response_mask, old_logprobs=engine_logprobs, scores=torch.zeros(batch_size))
    return batch.to(device), {"has_stop": has_stop.to(device), "engine_logprobs": engine_logprobs.to(device)}


# ---------------------------------------------------------------------------------------------- the update


RewardFn = Callable[[list[Completion]], tuple[list[float], dict[str, list]]]  # -> total, per reward name


@dataclass
class UpdateStats:
    """What one update returns: the metrics (keys declared in alignment/metrics.py, plain floats) and one sample."""

    metrics: dict[str, float]
    sample: Completion
    sample_score: float  # the reward functions' total, before the EOS penalty


def new_accelerator():
    """An `accelerate.Accelerator` over the launcher's environment (torch.distributed.run or accelerate launch: DDP
    with nccl on GPUs, gloo on CPUs -- accelerate takes a CPU world only when told `cpu=True`); one process
    without one. The caller places the models (bitsandbytes places 4-bit weights itself): accelerate only wraps."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), device_placement=False)


class PPOTrainer:
    """The PPO loop over `Roles` and a rollout engine on an `accelerate.Accelerator`: `step(prompt_ids, reward_fn)`
    runs one update as named, timed phases (generate -> score -> forward -> advantages -> train -> sync -> kl
    controller); `save` / `load` hold everything a resume needs.

    Across processes (DDP: `torch.distributed.run` or `accelerate launch`) each rank steps on its own shard of the
    update's prompts: the policy and the value head / critic are prepared (DDP-wrapped, gradients averaged), the
    reference stays a frozen local copy, and every statistic that steers training -- advantage (and reward)
    whitening, the loss normalisers, the KL fed to the adaptive controller -- and every logged metric is taken over
    the global batch (`accelerator.reduce` of sums and counts), so a run means the same at any process count.

    Raises:
        ValueError: a rollout that is not `cfg.rollout_size` sequences; `cfg.max_steps` unset; a bad role setup.
    """

    def __init__(self, roles: Roles, engine, cfg: PPOConfig, sampling: SamplingConfig, *, stop_id: int, pad_id: int,
                 accelerator=None):
        if sampling.top_k or sampling.top_p < 1 or sampling.temperature <= 0:
            raise ValueError("ppo samples from the policy itself: temperature > 0, top_k 0, top_p 1")
        if cfg.max_steps <= 0:
            raise ValueError("set cfg.max_steps (the updates) first, e.g. to cfg.num_updates(...)")
        self.roles, self.engine, self.cfg, self.sampling = roles, engine, cfg, sampling
        self.stop_id, self.pad_id = stop_id, pad_id
        self.device = next(roles.policy.parameters()).device
        self.accelerator = accelerator or new_accelerator()
        self.num_processes = self.accelerator.num_processes
        # one process: no collective at all, so the statistics are computed exactly as they always were
        self.all_reduce: Optional[AllReduce] = (
            None if self.num_processes == 1 else functools.partial(self.accelerator.reduce, reduction="sum"))
        policy_params, critic_params = roles.trainable()
        self.params = policy_params + critic_params
        optimizer = torch.optim.AdamW(
            [{"params": policy_params, "lr": cfg.learning_rate},
             {"params": critic_params, "lr": cfg.critic_learning_rate or cfg.learning_rate}],
            eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        # no warmup, linear decay to 0 over the updates; one scheduler step per update (N+, NB General 5). Not
        # prepared: accelerate's scheduler wrapper steps once per process, where ours counts updates.
        decay = (lambda u: 1.0 - u / cfg.max_steps) if cfg.lr_scheduler_type == "linear" else (lambda u: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        # DDP wraps what trains; its wrappers run only the forward passes that backpropagate (`minibatch_loss`).
        # The reference (and a reward model) stay inference-only local copies. Under ZeRO-3 / FSDP they would be
        # sharded too, as TRL's trainers do: `trl.models.utils.prepare_deepspeed(model, accelerator)` (deepspeed's
        # inference `initialize` with the run's ZeRO-3 config) or `prepare_fsdp(model, accelerator)`, else
        # `accelerator.prepare_model(model, evaluation_mode=True)`; `run` refuses those engines until then.
        value_module = roles.value_head if roles.value_head is not None else roles.critic
        self.policy, self.value_model, self.optimizer = self.accelerator.prepare(roles.policy, value_module, optimizer)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.update = 0  # updates done
        self.skip_nonfinite = None  # (params, update) -> True to skip a step with non-finite gradients (StageContext's)

    def autocast(self):
        """bf16 autocast around the models' forward passes when `bf16` (mixed precision, like TRL's `bf16`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks (itself in one process)."""
        return x if self.all_reduce is None else self.all_reduce(x)

    def _row_mean(self, x: torch.Tensor) -> float:
        """Mean of a per-sequence statistic (B,) over the global batch."""
        if self.all_reduce is None:
            return x.float().mean().item()
        total, count = self.all_reduce(torch.tensor([x.double().sum().item(), len(x)], dtype=torch.float64,
                                                    device=x.device)).tolist()
        return total / count

    # -------------------------------------------------------------- phases

    def generate(self, prompt_ids: list[list[int]], seeds: Optional[list[int]] = None
                 ) -> tuple[list[Completion], RolloutBatch, dict]:
        """This rank's completions (the n of a prompt adjacent) and their batch. `seeds`, one per prompt, sample
        each prompt in its own generate call from its own seed: the same completions at any batch layout."""
        if seeds is None:
            groups = self.engine.generate(prompt_ids, self.sampling)
        else:
            groups = [group for ids, seed in zip(prompt_ids, seeds)
                      for group in self.engine.generate([ids], dataclasses.replace(self.sampling, seed=seed))]
        completions = [c for group in groups for c in group]
        batch, extra = collate(completions, pad_id=self.pad_id, stop_id=self.stop_id, device=self.device)
        return completions, batch, extra

    def score(self, completions: list[Completion], reward_fn: RewardFn, has_stop: torch.Tensor):
        """Scores (B,) with the EOS penalty applied, the scores before it, and their metrics (global batch)."""
        total, per_fn = reward_fn(completions)
        raw = torch.tensor(total, dtype=torch.float, device=self.device)
        every = self.accelerator.gather(raw)  # every rank's scores, in rank order (same count on each)
        metrics = {"reward/mean": every.mean().item(), "reward/std": every.std().item() if len(every) > 1 else 0.0}
        for name, values in per_fn.items():
            kept = [v for v in values if v is not None]
            summed, count = self._sum(torch.tensor([sum(kept), len(kept)], dtype=torch.float64,
                                                   device=self.device)).tolist()
            metrics[f"reward/{name}/mean"] = summed / count if count else float("nan")
        scores = raw
        if self.cfg.missing_eos_penalty is not None:  # checked against the configured stop id (checklist 1)
            scores = raw - self.cfg.missing_eos_penalty * (~has_stop).float()
        return scores, raw, metrics

    @torch.no_grad()
    def forward(self, batch: RolloutBatch) -> RolloutBatch:
        """Old log-probs recomputed by the trainer (so the first minibatch's ratio is 1), reference
        log-probs and rollout values, in micro-batches, no grad (the unwrapped models: no DDP bookkeeping)."""
        temperature, roles = self.sampling.temperature, self.roles
        old, ref, values = [], [], []
        for part in self._micro_batches(batch):
            with self.autocast():
                lp, _, v = policy_forward(roles.policy, part, temperature, value_head=roles.value_head)
                if roles.critic is not None:
                    v = critic_forward(roles.critic, part)
                if roles.reference is not None:
                    ref.append(policy_forward(roles.reference, part, temperature)[0])
                else:
                    with roles.policy.disable_adapter():
                        ref.append(policy_forward(roles.policy, part, temperature)[0])
            old.append(lp)
            values.append(v)
        return dataclasses.replace(batch, old_logprobs=torch.cat(old), ref_logprobs=torch.cat(ref),
                                   values=torch.cat(values))

    @torch.no_grad()
    def advantages(self, batch: RolloutBatch, scores: torch.Tensor) -> tuple[RolloutBatch, dict]:
        """Per-token rewards (score at the last valid token, -beta * KL), GAE per sequence, whitening over the
        global batch."""
        cfg, mask, reduce = self.cfg, batch.response_mask, self.all_reduce
        kl = compute_kl(batch.old_logprobs, batch.ref_logprobs, cfg.kl_estimator, response_mask=mask)
        rewards = compute_token_rewards(scores, kl, mask, self.kl_ctl.kl_coef)
        if cfg.whiten_rewards:  # keep the mean: the sign of a reward survives
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=reduce)
        advantages, returns = compute_gae(rewards, batch.values, mask, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda)
        metrics = {"kl/ref": self._row_mean(kl.sum(-1)), "kl/coef": self.kl_ctl.kl_coef,
                   "adv/mean": masked_mean(advantages, mask, all_reduce=reduce).item(),
                   "adv/std": _masked_std(advantages, mask, reduce),
                   "value/explained_var": _explained_var(returns, batch.values, mask, reduce)}
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce=reduce)
        return dataclasses.replace(batch, scores=scores, advantages=advantages, returns=returns), metrics

    def minibatch_loss(self, part: RolloutBatch, normalizer) -> tuple[torch.Tensor, dict]:
        """loss = policy + vf_coef * value - entropy_coef * entropy on `part`, each aggregated with the
        minibatch's `normalizer`, so micro-batch losses (and gradients) sum to the minibatch's."""
        cfg, roles, mask = self.cfg, self.roles, part.response_mask
        warming = self.update < cfg.critic_warmup
        # critic warm-up: the policy runs outside DDP, whose reducer would wait for policy gradients that never come
        policy = roles.policy if warming else self.policy
        value_head = self.value_model if roles.value_head is not None else None
        with self.autocast():
            logprobs, entropy, values = policy_forward(policy, part, self.sampling.temperature,
                                                       value_head=value_head, entropy=True, detach_trunk=warming)
            if roles.critic is not None:
                values = critic_forward(self.value_model, part, score=roles.critic.score)
        per_token, metrics = ppo_clip_loss(logprobs, part.old_logprobs, part.advantages, mask,
                                              clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                              dual_clip=cfg.dual_clip)
        if cfg.dual_clip is None:
            metrics.pop("policy/dual_clipfrac")
        value_per_token, value_metrics = compute_value_loss(values, part.values, part.returns, mask,
                                                            clip_eps_value=cfg.clip_eps_value)
        policy_loss = aggregate_loss(per_token, mask, cfg.loss_agg_mode, normalizer)
        value_loss = aggregate_loss(value_per_token, mask, cfg.loss_agg_mode, normalizer)
        loss = cfg.vf_coef * value_loss
        if not warming:
            loss = loss + policy_loss
        if cfg.entropy_coef and not warming:
            loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, cfg.loss_agg_mode, normalizer)
        metrics = {**metrics, **value_metrics, "policy/loss": policy_loss.detach(), "value/loss": value_loss.detach(),
                   "policy/entropy": masked_mean(entropy.detach(), mask)}
        return loss, metrics

    def train(self, batch: RolloutBatch) -> dict:
        """K epochs x M minibatches, a fresh permutation each epoch, one optimizer step per minibatch. Each rank
        takes its minibatch from its own shard; DDP averages the gradients over the W ranks, so each micro-batch's
        loss is normalised by the global minibatch's count / W (`aggregate_loss`)."""
        cfg, size = self.cfg, len(batch)
        if size != cfg.rollout_size:
            raise ValueError(f"the rollout holds {size} sequences; per_device_train_batch_size x "
                             f"gradient_accumulation_steps x num_mini_batches = {cfg.rollout_size}")
        mb_size, world = size // cfg.num_mini_batches, self.num_processes
        totals: dict[str, float] = {}
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(size).to(self.device)
            for m in range(cfg.num_mini_batches):
                # in rollout order: a micro-batch holds whole groups, whose prompt runs once (response_states)
                minibatch = batch.select(order[m * mb_size:(m + 1) * mb_size].sort().values)
                normalizer = _normalizer(minibatch.response_mask, cfg.loss_agg_mode)
                tokens = minibatch.response_mask.sum().clamp(min=1)
                if world > 1:
                    normalizer, tokens = self._sum(normalizer) / world, self._sum(tokens)
                self.optimizer.zero_grad(set_to_none=True)
                parts = list(self._micro_batches(minibatch))
                for i, part in enumerate(parts):
                    with self._no_sync(last=i == len(parts) - 1):  # DDP: one gradient all-reduce per minibatch
                        loss, metrics = self.minibatch_loss(part, normalizer)
                        loss.backward()
                    share = part.response_mask.sum() / tokens  # rates: token-weighted; losses already add up
                    for key, value in metrics.items():
                        weight = 1.0 if key in ("policy/loss", "value/loss") else share
                        totals[key] = totals.get(key, 0.0) + (value * weight).item()
                grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm.item()
                if not (self.skip_nonfinite and self.skip_nonfinite(self.params, self.update + 1)):
                    self.optimizer.step()
        steps = cfg.num_ppo_epochs * cfg.num_mini_batches
        if world > 1:  # rates add up over the ranks; each rank's loss share is W x its part; grad norms agree
            summed = self._sum(torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)).tolist()
            totals = {key: value / (world if key in ("policy/loss", "value/loss", "grad_norm") else 1)
                      for key, value in zip(totals, summed)}
        return {key: value / steps for key, value in totals.items()}

    def _no_sync(self, last: bool):
        """No DDP gradient all-reduce for a micro-batch that is not its minibatch's last."""
        if last or self.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for model in (self.policy, self.value_model):
            stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def sync_weights(self) -> None:
        """The engine takes the updated policy (all ranks hold the same weights after the DDP step)."""
        self.engine.sync_weights(self.roles.policy)

    def step(self, prompt_ids: list[list[int]], reward_fn: RewardFn, seeds: Optional[list[int]] = None) -> UpdateStats:
        """One PPO update on `prompt_ids` (this rank's prompts, as token ids; the engine draws n completions of
        each; `seeds` as in `generate`)."""
        timings: dict[str, float] = {}
        timed = functools.partial(_timed, timings)
        with timed("step"):
            lr = self.scheduler.get_last_lr()[0]
            with timed("generate"):
                completions, batch, extra = self.generate(prompt_ids, seeds)
            with timed("score"):
                scores, raw_scores, metrics = self.score(completions, reward_fn, extra["has_stop"])
            with timed("forward"):
                batch = self.forward(batch)
            with timed("advantages"):
                batch, adv_metrics = self.advantages(batch, scores)
            with timed("train"):
                train_metrics = self.train(batch)
            self.scheduler.step()
            with timed("sync"):
                self.sync_weights()
            self.kl_ctl.update(adv_metrics["kl/ref"], len(batch) * self.num_processes)
        self.update += 1
        mask, lengths = batch.response_mask, batch.response_mask.sum(-1).float()
        tokens = self._sum(torch.tensor(float(sum(len(c.completion_ids) for c in completions)), device=self.device)).item()
        metrics |= adv_metrics | train_metrics | {
            "response/length_mean": self._row_mean(lengths),
            "response/truncated_frac": self._row_mean((~extra["has_stop"]).float()),
            "rollout/logprob_diff": masked_mean((extra["engine_logprobs"] - batch.old_logprobs).abs(), mask,
                                                all_reduce=self.all_reduce).item(),
            "rollout/tokens_per_sec": tokens / max(timings["generate"], 1e-9),  # every rank's, over this rank's time
            "learning_rate": lr,
        } | {f"timing/{phase}": seconds for phase, seconds in timings.items()}
        return UpdateStats(metrics=metrics, sample=completions[0], sample_score=float(raw_scores[0]))

    def _micro_batches(self, batch: RolloutBatch):
        """Slices of `per_device_train_batch_size` sequences: one forward (and backward) each."""
        size = self.cfg.per_device_train_batch_size
        for start in range(0, len(batch), size):
            yield batch.select(slice(start, start + size))

    # -------------------------------------------------------------- checkpoints

    def save(self, folder: Path) -> None:
        """policy/ (adapter or full weights, HF format), value_head.safetensors or critic/, state.pt
        (optimizer, scheduler, update count, KL coefficient, every rank's RNG states: tensors and plain data only,
        so `load` reads it with `weights_only=True`), written by the main process to a temporary folder, then
        renamed. Every rank calls it (the RNG states are gathered); it returns once the folder is complete."""
        from accelerate.utils import gather_object
        from safetensors.torch import save_file

        rng = gather_object([_rng_state()])  # one per rank, in rank order (DDP keeps the rest equal on all ranks)
        if self.accelerator.is_main_process:
            tmp = folder.with_name("tmp-" + folder.name)
            shutil.rmtree(tmp, ignore_errors=True)
            self.roles.policy.save_pretrained(tmp / "policy")
            if self.roles.value_head is not None:
                save_file(self.roles.value_head.state_dict(), tmp / "value_head.safetensors")
            else:
                self.roles.critic.save_pretrained(tmp / "critic")
            torch.save({"update": self.update, "optimizer": self.optimizer.state_dict(), "rng": rng,
                        "scheduler": self.scheduler.state_dict(), "kl_coef": self.kl_ctl.kl_coef}, tmp / "state.pt")
            (tmp / CHECKPOINT_STATE).write_text(json.dumps({"global_step": self.update}))  # last: the folder is complete
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        self.accelerator.wait_for_everyone()

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (every rank reads the same folder); push the restored policy into the engine.
        A rank the checkpoint has no RNG state for (more processes than it was saved with) reseeds from
        `cfg.seed`, its rank and the update.

        Nothing here can run code from the folder: weights come from safetensors, `state.pt` is read
        with `weights_only=True` (tensors, numbers, strings, lists, tuples, dicts).

        Raises:
            RuntimeError: `state.pt` holds anything else (a planted pickle or a foreign file), naming it.
        """
        from safetensors.torch import load_file

        _load_weights(self.roles.policy, folder / "policy")
        if self.roles.value_head is not None:
            self.roles.value_head.load_state_dict(load_file(folder / "value_head.safetensors", device=str(self.device)))
        else:
            _load_weights(self.roles.critic, folder / "critic")
        try:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0]
            raise RuntimeError(f"{folder / 'state.pt'}: refused to load: it holds more than tensors and plain data "
                               f"({reason}). alignkit never unpickles code from a run directory; delete {folder} "
                               f"to resume from an earlier checkpoint, or rerun the stage with --force") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.update, self.kl_ctl.kl_coef = state["update"], state["kl_coef"]
        rank = self.accelerator.process_index
        if rank < len(state["rng"]):
            _set_rng_state(state["rng"][rank])
        else:
            _seed_everything((self.cfg.seed or 0) + rank * RANK_SEED_STRIDE + self.update)
        self.sync_weights()


def _rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and plain data."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The minibatch's count for `aggregate_loss`: valid tokens (token-mean) or sequences with one."""
    return mask.sum().clamp(min=1) if mode == "token-mean" else (mask.sum(-1) > 0).sum().clamp(min=1)


def _masked_std(x: torch.Tensor, mask: torch.Tensor, all_reduce: Optional[AllReduce] = None) -> float:
    return masked_var(x, mask, all_reduce=all_reduce).sqrt().item() if masked_count(mask, all_reduce=all_reduce) > 1 else 0.0


def _explained_var(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   all_reduce: Optional[AllReduce] = None) -> float:
    if masked_count(mask, all_reduce=all_reduce) < 2:
        return float("nan")
    var = masked_var(returns, mask, all_reduce=all_reduce)
    return (1 - masked_var(returns - values, mask, all_reduce=all_reduce) / var).item() if var > 0 else float("nan")


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def _load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load `save_pretrained` output into a live model: a peft adapter, or full weights (tied ones once)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected or not state:
        raise RuntimeError(f"checkpoint {folder} does not match the model (unexpected keys: {unexpected[:5]})")


# ---------------------------------------------------------------------------------------------- the stage


def _setup_roles(ctx: StageContext, cfg: PPOConfig, device: torch.device) -> Roles:
    """Policy (+ LoRA/QLoRA), reference (the adapter disabled, or a frozen copy), value head or critic, on
    `device` (this rank's)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantized, checkpointing = ctx.model_cfg.quantization is not None, ctx.model_cfg.gradient_checkpointing

    def place(model):
        return model if quantized else model.to(device)  # bitsandbytes places 4-bit weights itself

    def with_adapter(model, task_type):
        peft_cfg = ctx.peft_config(task_type)
        if peft_cfg is None:
            return model
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        peft_cfg.lora_dropout = 0.0  # dropout off (checklist 0)
        return get_peft_model(model, peft_cfg)

    policy = with_adapter(place(ctx.load_model()), "CAUSAL_LM")
    reference = None
    if ctx.peft_config() is None:  # an adapter is disabled for the reference; full weights need a copy
        reference = place(ctx.load_model()).eval().requires_grad_(False)
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    value_head = critic = None
    if cfg.critic == "value_head":
        value_head = new_value_head(policy)
    else:
        critic = with_adapter(place(_load_critic(ctx)), "SEQ_CLS")
    for model in (policy, critic):
        if model is not None:
            disable_dropout(model)
            model.train()
    return Roles(policy=policy, reference=reference, value_head=value_head, critic=critic)


def _load_critic(ctx: StageContext):
    """A sequence-classification model from the first `reward_model` reward's stage (N+, Stiennon et al.),
    else from the policy's start weights with a zero head (NB Policy 2)."""
    from alignment.models import load_model

    rm_stages = [r.model_extra["stage"] for r in ctx.spec.rewards if r.name == "reward_model"]
    path = ctx.weights(rm_stages[0]) if rm_stages else ctx.start_path()
    critic = load_model(path, ctx.model_cfg, head="sequence_classification")
    if not rm_stages:
        torch.nn.init.zeros_(critic.score.weight)
    print(f"alignkit: ppo critic initialised from {rm_stages[0] if rm_stages else 'the policy'} ({path})", flush=True)
    return critic


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def prompt_rows(dataset, update: int, num_prompts: int, seed: int) -> list[dict]:
    """The `num_prompts` prompts of update `update`: a fresh shuffle per pass over the data, a function of the
    update index alone, so a resumed run sees the same prompts."""
    n, rows = len(dataset), []
    for k in range(update * num_prompts, (update + 1) * num_prompts):
        epoch, position = divmod(k, n)
        rows.append(dataset[int(_permutation(n, seed + epoch)[position])])
    return rows


def _reward_fn(funcs, weights, rows: list[dict], num_generations: int) -> RewardFn:
    """Completions -> `rewards.score` over texts (chat prompts get assistant messages), with the rows'
    other columns repeated per completion."""
    from rewards import score

    def fn(completions):
        mine = [rows[i // num_generations] for i in range(len(completions))]
        prompts = [r["prompt"] for r in mine]
        texts = [c.text if isinstance(p, str) else [{"role": "assistant", "content": c.text}]
                 for p, c in zip(prompts, completions)]
        columns = {key: [r[key] for r in mine] for key in rows[0] if key != "prompt"}
        columns.setdefault("completion_ids", [c.completion_ids for c in completions])
        return score(funcs, weights, prompts, texts, **columns)

    return fn


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _defaults(recipe, name):
    return {"seed": recipe.seed}


def _upgrade(recipe, name):
    """PPO args of alignkit before it took TRL's names (the issue-14 rename): `num_minibatches` ->
    `num_mini_batches`, `adam_eps` -> `adam_epsilon`, and the rollout given as `batch_size` prompts (x
    `rollout.num_generations` sequences) with `micro_batch_size` sequences per forward/backward ->
    `per_device_train_batch_size` = the micro batch (unset: a whole minibatch) and `gradient_accumulation_steps`
    = micro batches per minibatch. The same rollout and steps as before, on one process. Returns one warning
    `Problem` per rewritten key."""
    from alignment.recipe import Problem

    spec, notes = recipe.stages[name], []
    args, where = spec.args, ("stages", name, "args")
    for old, new in (("num_minibatches", "num_mini_batches"), ("adam_eps", "adam_epsilon")):
        if old in args and new not in args:
            args[new] = args.pop(old)
            notes.append(Problem(where + (old,), f"'{old}' is now '{new}' (TRL's name): read as {new}: {args[new]}"))
    if "batch_size" in args and "per_device_train_batch_size" not in args:
        prompts, micro = args.pop("batch_size"), args.pop("micro_batch_size", None)
        try:
            minibatch = int(prompts) * spec.rollout.num_generations // int(args.get("num_mini_batches", 2))
            micro = int(micro or minibatch)
        except (TypeError, ValueError):  # not numbers: PPOConfig's own check names them
            args["per_device_train_batch_size"] = prompts
            return notes
        args["per_device_train_batch_size"], args["gradient_accumulation_steps"] = micro, max(1, minibatch // micro)
        notes.append(Problem(where + ("batch_size",), (
            f"'batch_size' (prompts per rollout) is gone: the rollout is now per_device_train_batch_size x "
            f"gradient_accumulation_steps x num_mini_batches sequences per process; read as "
            f"per_device_train_batch_size: {micro}, gradient_accumulation_steps: {max(1, minibatch // micro)}")))
    return notes


@stage("ppo", config=lambda: PPOConfig, formats=("prompt",), check=_check, defaults=_defaults, generates=True,
       upgrade=_upgrade)
def run(ctx: StageContext) -> StageResult:
    from accelerate import DistributedType

    from alignment.rollout import encode_prompts

    cfg, rollout = PPOConfig(**ctx.args), ctx.rollout
    accelerator = new_accelerator()
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise RuntimeError(f"ppo runs on one process or under DDP; {accelerator.distributed_type.value} (FSDP, "
                           f"DeepSpeed) is not supported for it yet: use an accelerate config without sharding")
    if world > 1 and rollout.backend != "hf":
        raise RuntimeError(_MULTI_PROCESS_BACKEND.format(rollout.backend))
    # a stream per rank (checklist 0), rank 0's the seed's own; the trained weights start equal on every rank all
    # the same (a LoRA adapter's random init included): DDP broadcasts rank 0's when it wraps them
    _seed_everything(cfg.seed + rank * RANK_SEED_STRIDE)

    tokenizer, dataset = ctx.tokenizer(), ctx.dataset()
    cfg = dataclasses.replace(cfg, max_steps=cfg.num_updates(len(dataset), rollout.num_generations, world))
    ctx.trainer_config = dataclasses.asdict(cfg) | {"num_processes": world}
    prompts_per_rank = cfg.rollout_size // rollout.num_generations
    save_steps = cfg.save_steps or max(1, cfg.max_steps // 5)
    funcs, weights = ctx.reward_functions()
    roles = _setup_roles(ctx, cfg, accelerator.device)
    stop_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id not in (None, stop_id) else int(stop_id == 0)
    policy = roles.policy
    engine = ctx.rollout_engine(policy, tokenizer, seed=cfg.seed)
    sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                              top_p=1.0, top_k=0, n=rollout.num_generations)
    trainer = PPOTrainer(roles, engine, cfg, sampling, stop_id=stop_id, pad_id=pad_id, accelerator=accelerator)
    trainer.skip_nonfinite = ctx.skip_nonfinite
    resume = ctx.last_checkpoint()
    if resume:
        if main:
            print(f"alignkit: resuming {ctx.name} from {Path(resume).name}", flush=True)
        trainer.load(Path(resume))  # every rank, from the same folder
        if main:
            ctx.rundir.truncate_metrics(ctx.name, trainer.update)

    progress = ctx.progress(cfg.max_steps, trainer.update) if main else None
    started, stats = time.time(), None
    try:
        while trainer.update < cfg.max_steps:
            # the update's prompts are the same on every rank; each takes its contiguous share
            first = trainer.update * prompts_per_rank * world
            rows = prompt_rows(dataset, trainer.update, prompts_per_rank * world, cfg.seed)[
                rank * prompts_per_rank:(rank + 1) * prompts_per_rank]
            seeds = None
            if cfg.rollout_seed_per_prompt:
                seeds = [cfg.seed * PROMPT_SEED_STRIDE + first + rank * prompts_per_rank + i for i in range(len(rows))]
            stats = trainer.step(encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                                 _reward_fn(funcs, weights, rows, rollout.num_generations), seeds)
            step = trainer.update
            ctx.check_rewards(step)
            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                _sum_missing_over_ranks(trainer, funcs)
                if main:
                    ctx.log_metrics(step, stats.metrics)
            if main:
                progress.update(step, stats.metrics)
                if step % cfg.sample_steps == 0 or step == 1:
                    cut = "" if stats.sample.finish_reason == "stop" else ", no EOS"
                    progress.print(f"  sample at update {step} (reward {stats.sample_score:.3f}{cut}): "
                                   f"{_prompt_text(rows[0]['prompt'])!r} -> {stats.sample.text!r}")
            if step % save_steps == 0 and step < cfg.max_steps:
                _save_checkpoint(ctx, trainer, step, cfg.save_total_limit)
    finally:
        if progress is not None:
            progress.stop()
        engine.close()

    if main:
        ctx.save_model(policy, tokenizer)
    accelerator.wait_for_everyone()
    final = {k: stats.metrics[k] for k in ("reward/mean", "kl/ref", "value/explained_var")} if stats else {}
    return StageResult(metrics={**final, **reward_trend(ctx.rundir.read_metrics(ctx.name)), "updates": trainer.update,
                                "train_runtime": round(time.time() - started, 1)},
                       info={"rollout_backend": engine.name})


def _sum_missing_over_ranks(trainer: PPOTrainer, funcs) -> None:
    """Every rank's count of lost scores (`reward/<fn>/missing`, logged by the main process) into the main
    process's reward functions; the other ranks' counts restart at 0."""
    from rewards import BoundReward

    bound = [fn for fn in funcs if isinstance(fn, BoundReward)]
    if trainer.num_processes == 1 or not bound:
        return
    counts = trainer._sum(torch.tensor([float(fn.missing) for fn in bound], device=trainer.device)).tolist()
    for fn, count in zip(bound, counts):
        fn.missing = int(count) if trainer.accelerator.is_main_process else 0


def _save_checkpoint(ctx: StageContext, trainer: PPOTrainer, step: int, keep: int) -> None:
    """checkpoint-<update>, keeping the newest `keep` (every rank joins; the main process writes); then
    `ctx.fault_hook`."""
    main = trainer.accelerator.is_main_process
    if main:
        ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    trainer.save(ctx.rundir.checkpoint(ctx.name, step))
    if main:
        for old in ctx.rundir.checkpoints(ctx.name)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.fault_hook(step)
