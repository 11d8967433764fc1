"""Peak device memory per stage, estimated before anything loads: will it fit?

Parameters are counted from the model's `config.json` on the meta device (`accelerate.init_empty_weights`
+ `AutoModelForCausalLM.from_config`), so a folder holding only `config.json` is enough to plan a 70B
recipe on a laptop. A hub id's config is read from `configs/<hub id>/config.json` in the recipe's folder
or any folder above it (the shipped recipes keep theirs in `recipes/field/configs/`), else from the HF cache.

The estimate per device, in bytes, is the sum of these parts (`Estimate.parts`):

- `weights`: the policy's parameters by dtype; 4-bit (nf4/fp4) or 8-bit (LLM.int8) for the decoder's linear
  layers when quantized, embeddings / norms / head staying in the compute dtype.
- `adapter`: trainable peft parameters (LoRA r x (in + out) per targeted linear, DoRA + out), in fp32 as
  peft keeps them (`autocast_adapter_dtype`).
- `gradients`: one per trainable parameter, in its dtype.
- `optimizer`: AdamW 2 states in the parameter's dtype (torch), 2 bytes for 8-bit optimizers (bitsandbytes),
  DeepSpeed's fp32 master copy + 2 fp32 states for 16-bit parameters.
- `activations`: micro batch x sequence x per-layer saved tensors (`ACT_*` below) x layers, or with gradient
  checkpointing the layer inputs (batch x sequence x hidden x layers) plus one layer being recomputed.
- `logits`: what the method's loss holds of the batch x sequence x vocab logits at its peak (`LOGITS`): TRL 1.16's
  SFT / DPO / KTO / GRPO / RLOO score tokens through a fused LM head (`trl.trainer.utils.add_fused_lm_head`) in tiles
  of at most 4096 tokens x 32768 vocabulary entries, folded in a Triton kernel on CUDA and in plain torch
  elsewhere (~34 bytes per tile element on CPU); TRL's experimental trainers (ORPO, CPO, online DPO, GKD) take the
  model's full logits; our PPO scores 256 tokens at a time (`algos.logprobs_from_hidden`).
- `extra_models`: the models the method keeps (`METHODS`): a frozen reference (DPO, KTO, GRPO with beta > 0,
  PPO) unless an adapter can be disabled instead, PPO's separate critic, a reward-model reward.
- `rollout`: colocated vLLM's reservation (`gpu_memory_utilization` x device memory) or HF generate's KV cache.

Divided per the stage's launch (its accelerate config): DDP keeps everything on each device and adds the
gradient buckets; ZeRO-2 shards gradients and optimizer; ZeRO-3 / FSDP shard weights too (plus two gathered
layers); CPU offload takes the optimizer (and with param offload the weights) off the device. The peak is the
sum of the parts (gradients and activations do coexist: measured, `bench/memory.md`).

Checked against CPU runs here and torchtune's published Llama-3.1-8B figures: `bench/memory.md`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from alignment.recipe import Recipe
from alignment.registry import Registry

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLAN_DEVICE = "cuda"  # the device type a plan is for unless told otherwise (bench/ plans its CPU runs with "cpu")
PLAN_AUTO_DTYPE = "bfloat16"  # `dtype: auto` on a GPU that plans to fit (alignment.models.torch_dtype's choice)
ADAPTER_BYTES = 4  # peft keeps adapter weights in fp32 under a 16-bit base (autocast_adapter_dtype=True)
# 4-bit: half a byte + blockwise absmax (fp32 per 64; double quant: 8-bit per 64 + fp32 per 64 x 256) -- QLoRA, 2.1
QUANT_BYTES = {(4, False): 0.5 + 4 / 64, (4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (8, False): 1.0, (8, True): 1.0}
# Tensors one decoder layer saves for backward, per token, in units of hidden (h), key/value width (kv) and
# MLP width (i): norms' inputs and outputs and the attention output (8h), k and v after RoPE (2kv), SwiGLU's
# gate, up, act(gate) and product (4i). SDPA / flash attention keep no seq x seq scores; `eager` adds them.
ACT_HIDDEN, ACT_KV, ACT_MLP = 8, 2, 4
FIT_RESERVE_GIB = 1.0  # CUDA context and allocator fragmentation, kept free when `run` checks the fit


class PlanError(ValueError):
    """The planner cannot read what it needs (no config.json for the model, an unreadable accelerate config)."""


# ---------------------------------------------------------------- the model, counted on the meta device


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and widths of one architecture (`model_shape`)."""

    params: int  # all parameters, tied ones once
    quantizable: int  # the decoder layers' linear weights (what bitsandbytes quantizes)
    head: int  # lm_head parameters when not tied to the embeddings (a reward model replaces it), else 0
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every Linear but lm_head
    layers: int
    hidden: int
    kv: int  # num_key_value_heads x head_dim
    intermediate: int
    vocab: int
    heads: int


def find_config(name_or_path: str, recipe_dir: Optional[Path] = None) -> Path:
    """The folder holding the model's config.json: a local folder, `bundled:NAME`, a hub id's shipped
    `configs/<hub id>/` in `recipe_dir` or a folder above it, or the HF cache.

    Raises:
        PlanError: none of these has it (says where to put it).
    """
    if name_or_path.startswith("bundled:"):
        from alignment.models import bundled_path

        return bundled_path(name_or_path.split(":", 1)[1])
    if (Path(name_or_path) / "config.json").is_file():
        return Path(name_or_path)
    if recipe_dir is not None:
        for folder in [Path(recipe_dir).resolve(), *Path(recipe_dir).resolve().parents]:
            if (folder / "configs" / name_or_path / "config.json").is_file():
                return folder / "configs" / name_or_path
    from huggingface_hub import hf_hub_download

    from alignment import hub

    why = hub.unreachable()
    try:
        with hub.cache_only() if why else contextlib.nullcontext():
            return Path(hf_hub_download(name_or_path, "config.json")).parent
    except Exception as e:  # offline and not cached, gated, unknown id, ...
        raise PlanError(f"no config.json for model '{name_or_path}': not a local folder, no configs/{name_or_path}/"
                        f"config.json beside the recipe or above it, and "
                        f"{hub.note(why) if why else f'the hub answered: {type(e).__name__}'}") from None


@functools.lru_cache(maxsize=32)
def model_shape(config_dir: str) -> ModelShape:
    """Count parameters of the architecture in `config_dir`/config.json on the meta device (no weights)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    text = config.get_text_config()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings as two tensors
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linears, quantizable = [], 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears.append((name, module.in_features, module.out_features))
            quantizable += module.weight.numel()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(
        params=params, quantizable=quantizable, head=0 if tied or head is None else head.weight.numel(),
        linears=tuple(linears), layers=text.num_hidden_layers, hidden=text.hidden_size,
        kv=getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size, heads=text.num_attention_heads)


# ---------------------------------------------------------------- sharding, from the stage's launch


@dataclass(frozen=True)
class Sharding:
    """How a stage spreads over `world` devices (read from its accelerate config by `sharding_of`)."""

    kind: str = "single"  # single | ddp | zero2 | zero3 | fsdp (FSDP full shard = ZeRO-3)
    world: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def deepspeed(self) -> bool:
        return self.kind in ("zero2", "zero3")

    @property
    def shards_weights(self) -> bool:
        return self.kind in ("zero3", "fsdp")

    def label(self) -> str:
        off = "+offload" if self.offload_optimizer or self.offload_params else ""
        return f"{self.kind}{off} x{self.world}" if self.world > 1 else f"{self.kind}{off}"


def sharding_of(recipe: Recipe, name: str, gpus: Optional[int] = None) -> Sharding:
    """The stage's `launch`: its accelerate config's distributed_type / zero_stage / offload, and the process
    count (`launch.num_processes`, else `gpus` when given, else the config's `num_processes`, else 1)."""
    launch = recipe.stage_launch(name)
    cfg: dict = {}
    if launch.accelerate_config:
        try:
            cfg = yaml.safe_load(Path(launch.accelerate_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PlanError(f"stage '{name}': cannot read accelerate config {launch.accelerate_config}: {e}") from None
    world = launch.num_processes or gpus or int(cfg.get("num_processes", 1) or 1)
    kind = {"DEEPSPEED": "zero", "FSDP": "fsdp", "MULTI_GPU": "ddp"}.get(cfg.get("distributed_type", ""), "ddp")
    ds, fsdp = cfg.get("deepspeed_config") or {}, cfg.get("fsdp_config") or {}
    if ds.get("deepspeed_config_file"):
        zero = json.loads(Path(ds["deepspeed_config_file"]).read_text()).get("zero_optimization", {})
        ds = {"zero_stage": zero.get("stage", 0), "offload_optimizer_device": zero.get("offload_optimizer", {}).get("device"),
              "offload_param_device": zero.get("offload_param", {}).get("device")}
    if kind == "zero":
        kind = {3: "zero3", 2: "zero2"}.get(int(ds.get("zero_stage", 0)), "ddp")  # ZeRO-1 ~ ddp here
    if kind == "fsdp" and fsdp.get("fsdp_sharding_strategy") in ("NO_SHARD", 3):
        kind = "ddp"
    if world == 1 and not (kind in ("zero3", "fsdp") and (ds or fsdp)):
        kind = "single"
    return Sharding(kind, world,
                    offload_optimizer=str(ds.get("offload_optimizer_device", "none")).lower() == "cpu" or bool(fsdp.get("fsdp_offload_params")),
                    offload_params=str(ds.get("offload_param_device", "none")).lower() == "cpu" or bool(fsdp.get("fsdp_offload_params")))


# ---------------------------------------------------------------- what one stage holds


@dataclass(frozen=True)
class Extra:
    """A model a method keeps beside the policy: `frozen` (forward only) or `trainable` (own grads + optimizer)."""

    role: str
    kind: str  # frozen | trainable
    quantized: bool = True  # loaded with the stage's quantization (a reference of a QLoRA policy is 4-bit too)


@dataclass(frozen=True)
class Setup:
    """One stage's memory-relevant settings, read from the recipe by `stage_setup` (the suggestions vary them)."""

    method: str
    dtype: str
    quant_bits: Optional[int]
    double_quant: bool
    adapter: Optional[str]  # lora | dora | rslora | None (full fine-tuning)
    adapter_r: int
    target_modules: tuple[str, ...] | str
    gradient_checkpointing: bool
    batch: int  # sequences per forward (micro batch x the method's factor, e.g. DPO's chosen + rejected)
    seq: int  # tokens per sequence
    logit_seq: int  # positions whose logits are computed (completion only for GRPO / PPO)
    optim: str
    eager_attention: bool
    sharding: Sharding
    extras: tuple[Extra, ...] = ()
    rollout: Optional[str] = None  # vllm | hf | None
    rollout_util: float = 0.0
    rollout_tokens: int = 0  # KV-cache tokens of HF generate (sequences x max_model_len)
    micro_batch: int = 1  # per_device_train_batch_size as the recipe sets it
    batch_factor: int = 1
    device: str = PLAN_DEVICE  # where the stage runs: TRL's fused LM head folds its tiles in Triton on CUDA only


@dataclass(frozen=True)
class MethodMemory:
    """What a method adds to a plain forward/backward: `batch_factor` sequences per example (DPO: chosen +
    rejected), how its loss computes log-probs (a `LOGITS` path), its sequence length, and the extra models it keeps."""

    batch_factor: int
    logits: str
    seq: Callable[[dict, Recipe, str], tuple[int, int]]  # (tokens per sequence, positions with logits)
    extras: Callable[[dict, Recipe, str], list[Extra]]


METHODS: Registry[MethodMemory] = Registry("memory model of a stage method")


@dataclass(frozen=True)
class LogitsPath:
    """How a loss turns the last hidden states into per-token log-probs: `elements(tokens, vocab)` is how many
    logits exist at once, `bytes_per_element(width, device)` what each holds at the loss's peak (its copies,
    temporaries and gradients), for a model dtype of `width` bytes on a `device` type (cuda | cpu)."""

    elements: Callable[[int, int], int]
    bytes_per_element: Callable[[int, str], float]


LOGITS: Registry[LogitsPath] = Registry("logits path of a stage method")
# TRL's fused LM head (`add_fused_lm_head`, trl/kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE tokens x
# `_CHUNKED_LOGPROB_CHUNK_SIZE` vocabulary entries, one tile buffer reused for every tile, recomputed in backward.
FUSED_TILE_TOKENS, FUSED_TILE_VOCAB = 4096, 32768
# On CUDA the Triton kernels fold a tile in place: the tile buffer in the compute dtype. Elsewhere the torch
# fallback (`_forward_tile` / `_backward_tile`) builds fp32 tensors of the tile's shape: the transformed logits,
# exp, exp x logits and the top-1 mask in forward; log-probs, probabilities, the target mask and the gradient terms
# in backward. Measured on this CPU (fp32, TRL 1.16): 33.3-35.9 bytes per tile element (bench/memory.md).
FUSED_CPU_BYTES = 34.0
LOGITS.register("fused")(LogitsPath(
    lambda tokens, vocab: min(tokens, FUSED_TILE_TOKENS) * min(vocab, FUSED_TILE_VOCAB),
    lambda width, device: width if device == "cuda" else FUSED_CPU_BYTES))


def _full_bytes(width: int, device: str) -> float:
    """The model's own (B, T, V) logits under TRL's experimental trainers (ORPO's NLL + log-odds, CPO, online DPO,
    GKD): the logits and their gradient in the model dtype, and ~24 bytes of fp32 copies -- the log-softmax of the
    log-probs and the NLL's cross-entropy kept for backward, their gradients, backward's softmax temporaries.
    Fitted to the ORPO run on CPU, 32 bytes in fp32 (bench/memory.md); one log-softmax alone measures 16.9."""
    return 2 * width + 24


LOGITS.register("full")(LogitsPath(lambda tokens, vocab: tokens * vocab, _full_bytes))
# Our PPO: `algos.logprobs_from_hidden` chunks under checkpointing: for one chunk, its logits, the fp32 log-softmax,
# the entropy's probabilities and their product, and backward's gradients (one chunk measured 26-30 bytes in fp32 on
# CPU, taken for every dtype: the log-softmax and entropy run in fp32)
PPO_CHUNK_BYTES = 30.0
LOGITS.register("chunked")(LogitsPath(lambda tokens, vocab: min(tokens, _ppo_chunk()) * vocab,
                                      lambda width, device: PPO_CHUNK_BYTES))
LOGITS.register("none")(LogitsPath(lambda tokens, vocab: 0, lambda width, device: 0.0))  # a reward model's 1-score head


@functools.cache
def _ppo_chunk() -> int:
    """Tokens per chunk of our PPO's log-probs: `logprobs_from_hidden`'s default, which the PPO stage uses."""
    import inspect

    from alignment.algos import logprobs_from_hidden

    return inspect.signature(logprobs_from_hidden).parameters["chunk_size"].default


def _trl_seq(args, recipe, name):
    return int(args["max_length"]), int(args["max_length"])


def _rollout_seq(args, recipe, name):
    """Prompt + completion up to the rollout's max_model_len (an upper bound); logits for the completion only."""
    r = recipe.stages[name].rollout
    return r.max_model_len, r.max_new_tokens


def _no_extras(args, recipe, name):
    return []


def _reference_unless_adapter(args, recipe, name):
    """TRL's DPO / KTO: a disabled adapter is the reference; full fine-tuning copies the start model."""
    return [] if recipe.stage_model(name).adapter else [Extra("reference", "frozen")]


def _reward_models(recipe, name) -> list[Extra]:
    return [Extra(f"reward model ({r.model_extra['stage']})", "frozen", quantized=False)
            for r in recipe.stages[name].rewards if r.name == "reward_model" and "stage" in (r.model_extra or {})]


def _grpo_extras(args, recipe, name):
    ref = float(args.get("beta", 0.0)) > 0 and not recipe.stage_model(name).adapter
    return ([Extra("reference", "frozen")] if ref else []) + _reward_models(recipe, name)


def _ppo_extras(args, recipe, name):
    extras = _reference_unless_adapter(args, recipe, name)
    if args.get("critic") == "separate":
        extras.append(Extra("critic", "trainable"))
    return extras + _reward_models(recipe, name)


# TRL 1.16's SFT, DPO, KTO, GRPO and RLOO trainers all call `add_fused_lm_head` (the policy and the reference)
METHODS.register("sft")(MethodMemory(1, "fused", _trl_seq, _no_extras))
METHODS.register("reward")(MethodMemory(2, "none", _trl_seq, _no_extras))  # chosen + rejected; a 1-score head
METHODS.register("dpo")(MethodMemory(2, "fused", _trl_seq, _reference_unless_adapter))
METHODS.register("kto")(MethodMemory(2, "fused", _trl_seq, _reference_unless_adapter))  # + the KL batch
METHODS.register("grpo")(MethodMemory(1, "fused", _rollout_seq, _grpo_extras))
METHODS.register("ppo")(MethodMemory(1, "chunked", _rollout_seq, _ppo_extras))
METHODS.register("rloo")(MethodMemory(1, "fused", _rollout_seq, _grpo_extras))  # TRL's RLOO: GRPO's layout
# online DPO: two sampled completions per prompt, judged by reward functions or a reward-model stage
METHODS.register("online_dpo")(MethodMemory(2, "full", _rollout_seq,
                                            lambda args, recipe, name: _reference_unless_adapter(args, recipe, name)
                                            + _reward_models(recipe, name)))
for _name in ("orpo", "cpo", "simpo"):  # reference-free preference losses on chosen + rejected (trl.experimental)
    METHODS.register(_name)(MethodMemory(2, "full", _trl_seq, _no_extras))
# GKD: a frozen teacher, counted at the student's size (a teacher of another size is not read from its config)
METHODS.register("distill")(MethodMemory(1, "full", _trl_seq, lambda args, recipe, name: [Extra("teacher", "frozen", quantized=False)]))


def stage_args(recipe: Recipe, name: str) -> dict:
    """The stage's config values: its config class's defaults < `effective_args` (registered defaults + args)."""
    from alignment.stages import STAGES, effective_args, load_stages

    load_stages()
    fn = STAGES.get(recipe.stages[name].method)
    from pydantic.fields import FieldInfo

    defaults = {}
    for f in dataclasses.fields(fn.config_class()) if fn.config_class else ():
        value = f.default.default if isinstance(f.default, FieldInfo) else f.default  # PPOConfig is pydantic's
        if value is not dataclasses.MISSING and not repr(value).startswith("PydanticUndefined"):
            defaults[f.name] = value
    return {**defaults, **effective_args(recipe, name)}


def stage_setup(recipe: Recipe, name: str, gpus: Optional[int] = None, device: str = PLAN_DEVICE) -> Setup:
    """Read one stage's `Setup` from the recipe (model overrides, effective args, launch, rollout) for a stage
    run on `device` (a torch device type)."""
    spec, model = recipe.stages[name], recipe.stage_model(name)
    method, args = METHODS.get(spec.method), stage_args(recipe, name)
    seq, logit_seq = method.seq(args, recipe, name)
    micro = int(args.get("per_device_train_batch_size", 8))
    rollout, util, tokens = None, 0.0, 0
    if spec.rollout is not None:
        backend = spec.rollout.backend
        rollout = "vllm" if backend in ("auto", "vllm") else ("hf" if backend == "hf" else None)  # server: other GPUs
        util, tokens = spec.rollout.gpu_memory_utilization, micro * spec.rollout.max_model_len
    q = model.quantization
    return Setup(
        method=spec.method, dtype=PLAN_AUTO_DTYPE if model.dtype == "auto" else model.dtype,
        quant_bits=q.bits if q else None, double_quant=bool(q and q.double_quant),
        adapter=model.adapter.method if model.adapter else None, adapter_r=model.adapter.r if model.adapter else 0,
        target_modules=(model.adapter.target_modules if isinstance(model.adapter.target_modules, str)
                        else tuple(model.adapter.target_modules)) if model.adapter else "all-linear",
        gradient_checkpointing=bool(args.get("gradient_checkpointing", model.gradient_checkpointing)),
        batch=micro * method.batch_factor, seq=seq, logit_seq=logit_seq,
        optim=str(args.get("optim", "adamw_torch")), eager_attention=model.attn_implementation == "eager",
        sharding=sharding_of(recipe, name, gpus), extras=tuple(method.extras(args, recipe, name)),
        rollout=rollout, rollout_util=util, rollout_tokens=tokens, micro_batch=micro, batch_factor=method.batch_factor,
        device=device)


# ---------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Peak bytes per device of one stage and its parts (module docstring); `gib()` for printing and JSON."""

    stage: str
    method: str
    sharding: str
    parts: dict[str, float]
    peak: float

    def gib(self) -> dict:
        return {"stage": self.stage, "method": self.method, "sharding": self.sharding,
                "peak_gib": round(self.peak / GiB, 3), "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()}}


def _adapter_params(shape: ModelShape, s: Setup) -> int:
    """peft's trainable count: r x (in + out) per targeted Linear ('all-linear' = every Linear but the head),
    DoRA adds a magnitude vector of `out`."""
    targets = s.target_modules
    total = 0
    for name, fan_in, fan_out in shape.linears:
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
            total += s.adapter_r * (fan_in + fan_out) + (fan_out if s.adapter == "dora" else 0)
    return total


def _weight_bytes(shape: ModelShape, s: Setup, *, quantized: bool, reward_head: bool = False) -> float:
    width = DTYPE_BYTES[s.dtype]
    params = shape.params - (shape.head if reward_head else 0)
    if s.quant_bits and quantized:
        return shape.quantizable * QUANT_BYTES[(s.quant_bits, s.double_quant)] + (params - shape.quantizable) * width
    return params * width


def _activation_bytes(shape: ModelShape, s: Setup, *, logits: str) -> tuple[float, float]:
    """(activations, logits) of one forward kept for backward, per device."""
    width, tokens = DTYPE_BYTES[s.dtype], s.batch * s.seq
    per_layer = tokens * (ACT_HIDDEN * shape.hidden + ACT_KV * shape.kv + ACT_MLP * shape.intermediate) * width
    if s.eager_attention:
        per_layer += s.batch * shape.heads * s.seq * s.seq * 2 * width  # scores and probabilities
    if s.gradient_checkpointing:
        acts = tokens * shape.hidden * width * shape.layers + per_layer  # layer inputs + one layer recomputed
    else:
        acts = per_layer * shape.layers
    path = LOGITS.get(logits)
    return acts, path.elements(s.batch * s.logit_seq, shape.vocab) * path.bytes_per_element(width, s.device)


def _optimizer_bytes_per_param(s: Setup, param_bytes: int) -> float:
    if "8bit" in s.optim:
        return 2.0  # two 8-bit states (bitsandbytes), blockwise scales negligible
    if s.optim.startswith("sgd") or s.optim.startswith("adafactor"):
        return 0.0  # no momentum / factored second moments: small next to the rest
    if s.sharding.deepspeed and param_bytes < 4:
        return 12.0  # fp32 master weights + fp32 exp_avg and exp_avg_sq
    return 2.0 * param_bytes  # torch AdamW: exp_avg, exp_avg_sq in the parameter's dtype


def estimate(shape: ModelShape, s: Setup, *, gpu_mem_gib: Optional[float] = None, stage: str = "") -> Estimate:
    """Peak bytes per device of a stage with setup `s` on an architecture `shape` (module docstring).

    Args:
        gpu_mem_gib: device memory, for colocated vLLM's `gpu_memory_utilization` share; without it the vLLM
            part is its weights (16-bit) and KV cache for the rollout.
    """
    width, sh = DTYPE_BYTES[s.dtype], s.sharding
    method = METHODS.get(s.method)
    reward_head = s.method == "reward"
    trainable = _adapter_params(shape, s) if s.adapter else shape.params
    train_bytes = ADAPTER_BYTES if s.adapter else width
    weights = _weight_bytes(shape, s, quantized=True, reward_head=reward_head)
    frozen = sum(_weight_bytes(shape, s, quantized=x.quantized) for x in s.extras if x.kind == "frozen")
    grads = trainable * train_bytes
    optimizer = trainable * _optimizer_bytes_per_param(s, train_bytes)
    acts, logits = _activation_bytes(shape, s, logits=method.logits)
    for x in s.extras:
        if x.kind == "trainable":  # PPO's separate critic: full weights, grads, optimizer, its own activations
            weights += shape.params * width
            grads += shape.params * width
            optimizer += shape.params * _optimizer_bytes_per_param(s, width)
            acts *= 2
    adapter = trainable * ADAPTER_BYTES if s.adapter else 0.0
    n = sh.world
    if sh.kind in ("zero2", "zero3", "fsdp"):
        grads, optimizer = grads / n, optimizer / n
    if sh.shards_weights:
        layer = (shape.params - shape.vocab * shape.hidden) / max(shape.layers, 1) * width
        weights, frozen, adapter = weights / n + 2 * layer, frozen / n, adapter / n  # + two gathered layers
    if sh.offload_optimizer:
        optimizer = 0.0
    if sh.offload_params:
        weights, frozen = (2 * (shape.params - shape.vocab * shape.hidden) / max(shape.layers, 1) * width), frozen / n
    buckets = grads if sh.kind == "ddp" and n > 1 else 0.0  # DDP's flat gradient buckets beside the grads
    rollout = 0.0
    if s.rollout == "vllm":
        kv = s.rollout_tokens * 2 * shape.layers * shape.kv * 2
        rollout = s.rollout_util * gpu_mem_gib * GiB if gpu_mem_gib else shape.params * 2 + kv
    elif s.rollout == "hf":
        rollout = s.rollout_tokens * 2 * shape.layers * shape.kv * width  # K and V per layer
    parts = {"weights": weights, "adapter": adapter, "gradients": grads + buckets, "optimizer": optimizer,
             "activations": acts, "logits": logits, "extra_models": frozen, "rollout": rollout}
    peak = sum(parts.values())  # gradients and activations coexist: measured on CPU (bench/memory.md)
    return Estimate(stage, s.method, sh.label(), parts, peak)


# ---------------------------------------------------------------- a recipe: plan, fit, suggestions


@dataclass
class StagePlan:
    estimate: Estimate
    fits: Optional[bool] = None  # None: no device memory given
    suggestions: list[str] = field(default_factory=list)  # changes that, each alone, make it fit


def _variants(s: Setup) -> list[tuple[str, Setup]]:
    """Changes to try when a stage does not fit, each alone, in the order they cost the least quality/speed."""
    out = []
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing (model.gradient_checkpointing: true)", dataclasses.replace(s, gradient_checkpointing=True)))
    if s.quant_bits != 4:
        lora = {} if s.adapter else {"adapter": "lora", "adapter_r": 16, "target_modules": "all-linear"}
        out.append(("4-bit QLoRA (model.quantization: {bits: 4}" + ("" if s.adapter else " with model.adapter") + ")",
                    dataclasses.replace(s, quant_bits=4, double_quant=True, **lora)))
    if s.sharding.world > 1 and not s.sharding.shards_weights:
        out.append((f"ZeRO-3 over the {s.sharding.world} devices (launch.accelerate_config: recipes/accelerate/zero3.yaml)",
                    dataclasses.replace(s, sharding=dataclasses.replace(s.sharding, kind="zero3"))))
    if "8bit" not in s.optim and (not s.adapter):
        out.append(("an 8-bit optimizer (args.optim: adamw_bnb_8bit)", dataclasses.replace(s, optim="adamw_bnb_8bit")))
    return out


def _smaller_batch(shape: ModelShape, s: Setup, budget: float, gpu_mem_gib: float) -> Optional[str]:
    micro = s.micro_batch // 2
    while micro >= 1:
        t = dataclasses.replace(s, batch=micro * s.batch_factor, micro_batch=micro,
                                rollout_tokens=s.rollout_tokens // s.micro_batch * micro)
        if estimate(shape, t, gpu_mem_gib=gpu_mem_gib).peak <= budget:
            return (f"a smaller micro batch: per_device_train_batch_size {micro} (from {s.micro_batch}; "
                    f"raise gradient_accumulation_steps to keep the global batch)")
        micro //= 2
    return None


def plan_recipe(recipe: Recipe, recipe_dir: Optional[Path] = None, *, gpus: Optional[int] = None,
                gpu_mem_gib: Optional[float] = None, stages: Optional[list[str]] = None,
                device: str = PLAN_DEVICE) -> dict[str, StagePlan]:
    """Estimate every stage (or `stages`) of a loaded recipe run on `device` (cuda, or cpu for the measured
    check in bench/); with `gpu_mem_gib`, say whether each fits in it minus `FIT_RESERVE_GIB`, and what would make
    a stage that does not fit fit.

    Raises:
        PlanError: a model's config.json cannot be found, or an accelerate config cannot be read.
    """
    shape = model_shape(str(find_config(recipe.model.name_or_path, recipe_dir)))
    out = {}
    for name in stages or recipe.order():
        s = stage_setup(recipe, name, gpus, device)
        est = estimate(shape, s, gpu_mem_gib=gpu_mem_gib, stage=name)
        plan = StagePlan(est)
        if gpu_mem_gib is not None:
            budget = (gpu_mem_gib - FIT_RESERVE_GIB) * GiB
            plan.fits = est.peak <= budget
            if not plan.fits:
                plan.suggestions = [label for label, t in _variants(s)
                                    if estimate(shape, t, gpu_mem_gib=gpu_mem_gib).peak <= budget]
                smaller = _smaller_batch(shape, s, budget, gpu_mem_gib)
                plan.suggestions += [smaller] if smaller else []
        out[name] = plan
    return out


def device_memory_gib() -> Optional[float]:
    """The first CUDA device's total memory in GiB, or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


class DoesNotFit(RuntimeError):
    """A stage's estimated peak exceeds the device's memory (`check_fits`)."""


def check_fits(recipe: Recipe, recipe_dir: Path, stages: list[str], gpu_mem_gib: Optional[float] = None) -> None:
    """`alignkit run`'s check before any model loads. The device memory is `gpu_mem_gib`, else the GPU's own;
    with neither (a CPU machine) nothing is checked: the estimate is of device memory.

    Raises:
        DoesNotFit: names each stage that does not fit, its peak and parts, and what would make it fit.
    """
    gpu_mem_gib = gpu_mem_gib or device_memory_gib()
    if gpu_mem_gib is None or not stages:
        return
    bad = [(n, p) for n, p in plan_recipe(recipe, recipe_dir, gpu_mem_gib=gpu_mem_gib, stages=stages).items() if not p.fits]
    if bad:
        lines = []
        for name, p in bad:
            parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in p.estimate.parts.items() if v >= 0.05 * GiB)
            fix = "; ".join(p.suggestions) or "none of gradient checkpointing, 4-bit, ZeRO-3, a smaller micro batch alone"
            lines.append(f"stage '{name}' ({p.estimate.method}, {p.estimate.sharding}) needs ~{p.estimate.peak / GiB:.1f} GiB "
                         f"per device of {gpu_mem_gib:.0f} GiB ({FIT_RESERVE_GIB:.0f} GiB kept free) [{parts}]; "
                         f"would fit with: {fix}")
        raise DoesNotFit("\n".join(lines) + "\n(alignkit plan RECIPE --gpu-mem GiB shows every part; "
                                            "--no-memory-check runs anyway)")
