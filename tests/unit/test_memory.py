"""The memory planner (alignment/memory.py): counts from config.json alone, parts by hand, sharding, and
`alignkit run`'s refusal of a stage that does not fit (exit 2, what would make it fit, --no-memory-check)."""
from __future__ import annotations

import json

import pytest

from alignment.memory import GiB, LOGITS, METHODS, check_fits, model_shape, plan_recipe, sharding_of
from alignment.validate import load_recipe
from tests.helpers import write_recipe

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
             "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}


@pytest.fixture
def config_70b(tmp_path):
    folder = tmp_path / "llama-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_70B))  # the folder holds nothing else
    return folder


def _recipe(tmp_path, model_path, stages, **top):
    return load_recipe(write_recipe(tmp_path / "r", model_path, stages, **top))


def cli(*args):
    from typer.testing import CliRunner

    from alignment.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_70b_config_alone_plans_in_seconds(tmp_path, config_70b):
    shape = model_shape(str(config_70b))
    assert 70.5e9 < shape.params < 70.6e9  # Llama-3.1-70B: 70.55 B parameters
    write_recipe(tmp_path / "r", config_70b, {"sft": {"method": "sft", "data": ["sft"]}},
                 model={"dtype": "bfloat16", "gradient_checkpointing": True},
                 launch={"accelerate_config": "zero3.yaml", "num_processes": 8})
    (tmp_path / "r" / "zero3.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\nnum_processes: 8\n")
    rec = load_recipe(tmp_path / "r" / "recipe.yaml")
    est = plan_recipe(rec, tmp_path / "r")["sft"].estimate
    # ZeRO-3 over 8: 70.55 B x 2 bytes / 8 weights + 2 gathered layers; DeepSpeed's fp32 Adam: 12 bytes / 8
    layer = (shape.params - shape.vocab * shape.hidden) / 80 * 2
    assert est.parts["weights"] == pytest.approx(shape.params * 2 / 8 + 2 * layer)
    assert est.parts["optimizer"] == pytest.approx(shape.params * 12 / 8)
    assert est.sharding == "zero3 x8"


def test_weights_by_dtype_and_4bit(tmp_path, config_70b):
    shape = model_shape(str(config_70b))
    stages = {"sft": {"method": "sft", "data": ["sft"]}}
    bf16 = plan_recipe(_recipe(tmp_path, config_70b, stages, model={"dtype": "bfloat16"}))["sft"].estimate
    q4 = plan_recipe(_recipe(tmp_path, config_70b, stages, model={
        "dtype": "bfloat16", "quantization": {"bits": 4}, "adapter": {"r": 16}}))["sft"].estimate
    assert bf16.parts["weights"] == shape.params * 2
    # decoder linears at 0.5 byte + double-quantised scales, embeddings and head stay bf16
    expected = shape.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256)) + (shape.params - shape.quantizable) * 2
    assert q4.parts["weights"] == pytest.approx(expected)
    assert q4.parts["weights"] < bf16.parts["weights"] / 3


def test_adapter_count_matches_peft(tiny_model_path, tmp_path):
    """LoRA r x (in + out) per targeted linear, DoRA + a magnitude per output: the count peft makes."""
    import peft
    from transformers import AutoModelForCausalLM

    for method, targets in (("lora", "all-linear"), ("dora", ["q_proj", "v_proj"])):
        rec = _recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}},
                      model={"adapter": {"method": method, "r": 4, "target_modules": targets}})
        est = plan_recipe(rec, tmp_path)["sft"].estimate
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                    peft.LoraConfig(r=4, target_modules=targets, use_dora=method == "dora"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert est.parts["adapter"] == trainable * 4, method  # fp32 adapter weights


def test_methods_keep_their_extra_models(tiny_model_path, tmp_path):
    pairs = tmp_path / "r" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True, exist_ok=True)
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    data = {"pairs": {"path": "pairs.jsonl"}}
    full = _recipe(tmp_path, tiny_model_path, {"dpo": {"method": "dpo", "data": ["pairs"]}}, data=data)
    lora = _recipe(tmp_path, tiny_model_path, {"dpo": {"method": "dpo", "data": ["pairs"]}}, data=data,
                   model={"adapter": {"r": 4}})
    assert plan_recipe(full)["dpo"].estimate.parts["extra_models"] > 0  # a frozen reference copy
    assert plan_recipe(lora)["dpo"].estimate.parts["extra_models"] == 0  # the disabled adapter is the reference


def test_trl_stages_hold_one_fused_lm_head_tile_not_the_logits(tmp_path, config_70b):
    """TRL's fused LM head scores <= 4096 tokens x <= 32768 vocabulary entries at a time: the logits part stops
    growing with the batch; on CUDA a tile is the bf16 buffer, on CPU the torch fallback's ~34 bytes per element."""
    def logits(batch, length, device="cuda", method="sft"):
        stages = {"s": {"method": method, "data": ["sft"], "args": {"per_device_train_batch_size": batch, "max_length": length}}}
        rec = _recipe(tmp_path, config_70b, stages, model={"dtype": "bfloat16"})
        return plan_recipe(rec, device=device)["s"].estimate.parts["logits"]

    tile = 4096 * 32768  # vocab 128256 > 32768
    assert logits(2, 2048) == logits(8, 2048) == tile * 2  # 4096 and 16384 tokens: one bf16 tile
    assert logits(1, 1024) == 1024 * 32768 * 2
    assert logits(2, 2048, device="cpu") == tile * 34
    # ORPO (trl.experimental) takes the model's full logits: chosen + rejected x 1024 x vocab, 2 x 2 + 24 bytes
    assert logits(1, 1024, method="orpo") == 2 * 1024 * 128256 * 28
    assert LOGITS.get("chunked").elements(10_000, 128256) == 256 * 128256  # our PPO: 256-token chunks


def test_the_fused_lm_head_rule_follows_the_installed_trl():
    """The planner's tile and its list of fused methods are TRL's: a TRL that changes them fails here."""
    import inspect

    import trl.trainer.dpo_trainer
    import trl.trainer.grpo_trainer
    import trl.trainer.kto_trainer
    import trl.trainer.rloo_trainer
    import trl.trainer.sft_trainer
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from alignment.memory import FUSED_TILE_TOKENS, FUSED_TILE_VOCAB

    assert (FUSED_TILE_TOKENS, FUSED_TILE_VOCAB) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)
    for method, module in (("sft", trl.trainer.sft_trainer), ("dpo", trl.trainer.dpo_trainer),
                           ("kto", trl.trainer.kto_trainer), ("grpo", trl.trainer.grpo_trainer),
                           ("rloo", trl.trainer.rloo_trainer)):
        assert "add_fused_lm_head(" in inspect.getsource(module), method
        assert METHODS.get(method).logits == "fused", method


def test_every_stage_method_has_a_memory_model():
    from alignment.stages import STAGES, load_stages

    load_stages()
    assert set(STAGES.names()) <= set(METHODS.names())


@pytest.mark.parametrize("config,kind", [("ddp", "ddp"), ("zero2", "zero2"), ("zero3", "zero3"), ("fsdp2", "fsdp")])
def test_sharding_read_from_the_shipped_accelerate_configs(tiny_model_path, tmp_path, config, kind):
    from pathlib import Path

    cfg = Path(__file__).parents[2] / "recipes" / "accelerate" / f"{config}.yaml"
    rec = _recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}},
                  launch={"accelerate_config": str(cfg)})
    assert sharding_of(rec, "sft") == sharding_of(rec, "sft", gpus=None)
    assert sharding_of(rec, "sft").kind == kind and sharding_of(rec, "sft").world == 8
    assert sharding_of(rec, "sft", gpus=2).world == 2


def test_gradient_checkpointing_and_zero3_lower_the_peak(tmp_path, config_70b):
    stages = {"sft": {"method": "sft", "data": ["sft"], "args": {"per_device_train_batch_size": 1}}}
    plain = plan_recipe(_recipe(tmp_path, config_70b, stages, model={"dtype": "bfloat16"}))["sft"].estimate
    ckpt = plan_recipe(_recipe(tmp_path, config_70b, stages, model={"dtype": "bfloat16", "gradient_checkpointing": True}))["sft"].estimate
    assert ckpt.parts["activations"] < plain.parts["activations"] / 10


def test_no_gpu_and_no_gpu_mem_checks_nothing(tmp_path, config_70b, monkeypatch):
    import alignment.memory as memory

    monkeypatch.setattr(memory, "device_memory_gib", lambda: None)
    rec = _recipe(tmp_path, config_70b, {"sft": {"method": "sft", "data": ["sft"]}})
    check_fits(rec, tmp_path / "r", ["sft"])  # a 70B full fine-tune, but no device to compare with
    with pytest.raises(memory.DoesNotFit, match="stage 'sft'"):
        check_fits(rec, tmp_path / "r", ["sft"], gpu_mem_gib=80)


def _tight_gpu_mem(tiny_model_path, tmp_path, stages):
    """Device memory between the stage's peak with gradient checkpointing and without it."""
    rec = _recipe(tmp_path, tiny_model_path, stages)
    plain = plan_recipe(rec)["sft"].estimate.peak
    stages["sft"].setdefault("model", {})["gradient_checkpointing"] = True
    ckpt = plan_recipe(_recipe(tmp_path, tiny_model_path, stages))["sft"].estimate.peak
    stages["sft"].pop("model")
    assert ckpt < plain
    return 1.0 + (plain + ckpt) / 2 / GiB  # + the reserve kept free


def test_run_refuses_a_stage_that_does_not_fit_before_loading_a_model(tiny_model_path, tmp_path):
    stages = {"sft": {"method": "sft", "data": ["sft"],
                      "args": {"max_steps": 1, "per_device_train_batch_size": 64, "max_length": 512}}}
    gpu_mem = _tight_gpu_mem(tiny_model_path, tmp_path, stages)
    recipe = write_recipe(tmp_path / "r", tiny_model_path, stages)
    res = cli("run", str(recipe), "--run-dir", str(tmp_path / "runs"), "--gpu-mem", f"{gpu_mem:.6f}")
    assert res.exit_code == 2, res.output
    assert "stage 'sft'" in res.output and "gradient checkpointing" in res.output
    assert "per_device_train_batch_size 32" in res.output  # the largest micro batch that fits
    assert not (tmp_path / "runs" / "t" / "sft").exists()  # refused before the stage started


@pytest.mark.slow
def test_no_memory_check_runs_anyway(tiny_model_path, tmp_path):
    stages = {"sft": {"method": "sft", "data": ["sft"],
                      "args": {"max_steps": 1, "per_device_train_batch_size": 64, "max_length": 512}}}
    gpu_mem = _tight_gpu_mem(tiny_model_path, tmp_path, stages)
    recipe = write_recipe(tmp_path / "r", tiny_model_path, stages)
    res = cli("run", str(recipe), "--run-dir", str(tmp_path / "runs"), "--gpu-mem", f"{gpu_mem:.6f}",
                  "--no-memory-check")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "t" / "sft" / "model").is_dir()


def test_plan_json_gives_peak_and_parts_per_stage(tiny_model_path, tmp_path):
    recipe = write_recipe(tmp_path / "r", tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}})
    res = cli("plan", str(recipe), "--json", "--gpus", "2", "--gpu-mem", "80")
    assert res.exit_code == 0, res.output
    stage = json.loads(res.output)["stages"]["sft"]
    assert stage["fits"] is True and stage["peak_gib"] > 0
    assert set(stage["parts_gib"]) == {"weights", "adapter", "gradients", "optimizer", "activations", "logits",
                                       "extra_models", "rollout"}
    # and the table's facts: where it starts, its data, whether it is done, its fingerprint
    assert {k: stage[k] for k in ("method", "from", "data", "state")} == {"method": "sft", "from": "base", "data": ["sft"],
                                                                        "state": "new"}
    assert len(stage["fingerprint"]) >= 8
