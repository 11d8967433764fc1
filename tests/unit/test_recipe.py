"""Recipe schema: every error names the file, the line, the key, and the closest valid name."""
from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from alignment.recipe import RecipeError
from alignment.validate import load_recipe

GOOD = """\
name: demo
model:
  name_or_path: some/model
  adapter: {method: lora, r: 8}
data:
  sft: {path: sft.jsonl}
  pairs: {path: pairs.jsonl}
stages:
  sft:
    method: sft
    data: [sft]
    args: {learning_rate: 1.0e-3, max_steps: 3}
  dpo:
    method: dpo
    from: sft
    data: [pairs]
    args: {beta: 0.1}
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(path) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return str(exc.value)


def test_good_recipe_loads_with_defaults_and_absolute_paths(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.order() == ["sft", "dpo"]
    assert r.stages["dpo"].from_ == "sft"
    assert r.model.adapter.alpha == 32  # default filled
    assert r.data["sft"].path == str(tmp_path / "sft.jsonl")  # relative to the recipe file


def test_misspelt_key_names_file_line_and_closest(tmp_path):
    p = write(tmp_path, GOOD.replace("  adapter: {method: lora, r: 8}", "  adaptor: {method: lora, r: 8}"))
    msg = error_of(p)
    assert f"{p}:4" in msg and "model.adaptor" in msg and "did you mean 'adapter'" in msg


def test_misspelt_nested_key(tmp_path):
    p = write(tmp_path, GOOD.replace("    method: dpo\n", "    method: dpo\n    form: sft\n"))
    msg = error_of(p)
    assert f"{p}:15" in msg and "stages.dpo.form" in msg and "did you mean 'from'" in msg


def test_unknown_trl_arg_is_checked_against_the_methods_config(tmp_path):
    p = write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "learnig_rate: 1.0e-3"))
    msg = error_of(p)
    assert f"{p}:12" in msg and "unknown SFTConfig argument 'learnig_rate'" in msg
    assert "did you mean 'learning_rate'" in msg


def test_dpo_arg_checked_against_dpo_config(tmp_path):
    p = write(tmp_path, GOOD.replace("beta: 0.1", "betta: 0.1"))
    msg = error_of(p)
    assert "DPOConfig" in msg and "'betta'" in msg and "did you mean 'beta'" in msg and f"{p}:17" in msg


def test_reserved_arg_refused(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("max_steps: 3", "output_dir: /tmp/x")))
    assert "'output_dir' is set by alignkit" in msg


def test_bad_yaml_names_the_line(tmp_path):
    p = write(tmp_path, GOOD.replace("    method: sft\n", "    method: [sft\n"))
    msg = error_of(p)
    assert "bad YAML" in msg and f"{p}:" in msg


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, GOOD.replace("    method: sft\n", "    method: sft\n    method: dpo\n"))
    assert "duplicate key 'method'" in error_of(p)


def test_from_missing_stage(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("from: sft", "from: stf")))
    assert "'stf' is not a stage" in msg and "did you mean 'sft'" in msg and "stages.dpo.from" in msg


def test_cycle(tmp_path):
    text = GOOD.replace("    method: sft\n", "    method: sft\n    from: dpo\n")
    msg = error_of(write(tmp_path, text))
    assert "cycle" in msg and "sft" in msg and "dpo" in msg


def test_undefined_data_name(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("data: [pairs]", "data: [pair]")))
    assert "dataset 'pair' is not defined" in msg and "did you mean 'pairs'" in msg and ":16" in msg


def test_unknown_method(tmp_path):
    msg = error_of(write(tmp_path, GOOD.replace("method: dpo", "method: dpoo")))
    assert "unknown method 'dpoo'" in msg and "did you mean 'dpo'" in msg


def test_wrong_type_and_missing_key(tmp_path):
    text = GOOD.replace("r: 8", "r: -3").replace("name: demo\n", "")
    msg = error_of(write(tmp_path, text))
    assert "missing required key 'name'" in msg
    assert "model.adapter.r" in msg and "greater than 0" in msg


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("learning_rate", "learnig_rate").replace("data: [pairs]", "data: [pair]")
    msg = error_of(write(tmp_path, text))
    assert "2 problem(s)" in msg


def test_stage_model_override(tmp_path):
    text = GOOD + "    model: {quantization: {bits: 4}, adapter: {method: dora, r: 4}}\n"
    r = load_recipe(write(tmp_path, text))
    m = r.stage_model("dpo")
    assert m.quantization.bits == 4 and m.adapter.method == "dora" and m.name_or_path == "some/model"
    assert r.stage_model("sft").quantization is None


def test_stage_model_override_survives_the_resolved_recipe(tmp_path):
    """The stage process reads the resolved recipe: a QLoRA override keeps the recipe's adapter there too."""
    from alignment.recipe import dump_recipe, parse_resolved

    r = load_recipe(write(tmp_path, GOOD + "    model: {quantization: {bits: 4}}\n"))
    m = parse_resolved(dump_recipe(r)).stage_model("dpo")
    assert m.quantization.bits == 4 and m.adapter.r == 8 and m == r.stage_model("dpo")


def test_cli_validate_exits_2_with_the_message(tmp_path):
    p = write(tmp_path, GOOD.replace("from: sft", "from: stf"))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert "'stf' is not a stage" in res.output


def test_the_schema_module_imports_no_registry():
    import subprocess
    import sys

    code = ("import sys, alignment.recipe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alignment', 'rewards', 'evals')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['alignment', 'alignment.recipe', 'alignment.registry']"


SFT_ONLY = {"sft": {"method": "sft", "data": ["sft"], "args": {"max_steps": 20}}}


def test_registered_defaults_are_in_the_fingerprint_and_the_trainer_config(tmp_path, monkeypatch):
    from trl import SFTConfig

    from alignment.pipeline import changed_keys, fingerprint, stage_inputs
    from alignment.stages import STAGES, StageContext
    from tests.helpers import write_recipe

    recipe = load_recipe(write_recipe(tmp_path, "some/model", SFT_ONLY))
    inputs = stage_inputs(recipe, "sft", {})
    assert inputs["args"]["max_length"] == 1024 and inputs["args"]["save_steps"] == 4  # 20 // 5
    sft = STAGES.get("sft")
    registered = sft.defaults
    monkeypatch.setattr(sft, "defaults", lambda r, n: {**registered(r, n), "max_length": 512})
    changed = stage_inputs(recipe, "sft", {})
    assert fingerprint(changed) != fingerprint(inputs) and changed_keys(inputs, changed) == ["args.max_length"]
    config = StageContext(recipe=recipe, name="sft", run_dir=tmp_path / "runs" / "t").trl_config(SFTConfig)
    assert config.max_length == 512 and config.save_steps == 4  # built from the same effective args


def test_generating_methods_get_a_full_rollout_section(tmp_path):
    from alignment.recipe import RolloutConfig, dump_recipe
    from alignment.stages import effective_args
    from tests.helpers import write_jsonl, write_recipe

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    stages = {**SFT_ONLY, "grpo": {"method": "grpo", "from": "sft", "data": ["prompts"],
                                   "rewards": [{"name": "math_accuracy"}]}}
    data = {"sft": {"path": "sft.jsonl"}, "prompts": {"path": "prompts.jsonl"}}
    write_jsonl(tmp_path / "sft.jsonl", [{"text": "1+1=2"}])
    recipe = load_recipe(write_recipe(tmp_path, "some/model", stages, data=data))
    assert recipe.stages["grpo"].rollout == RolloutConfig() and recipe.stages["sft"].rollout is None
    assert "num_generations: 4" in dump_recipe(recipe)  # the resolved recipe shows it
    args = effective_args(recipe, "grpo")
    assert args["per_device_train_batch_size"] == 8 and args["num_generations"] == 4 and args["reward_weights"] == [1.0]


@pytest.mark.parametrize("enforce_eager", [None, False, True])
def test_rollout_enforce_eager_reaches_the_vllm_engine_when_set(tmp_path, monkeypatch, enforce_eager):
    """`rollout.enforce_eager` (vLLM's name) goes to the engine when set; unset leaves vLLM's CPU / GPU default
    (alignment.rollout); a non-boolean is a recipe error naming the key."""
    import torch

    from alignment import rollout
    from alignment.stages import StageContext, load_stages
    from tests.helpers import write_jsonl, write_recipe

    load_stages()
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    spec = {"backend": "vllm", **({} if enforce_eager is None else {"enforce_eager": enforce_eager})}
    stages = {"grpo": {"method": "grpo", "data": ["prompts"], "rewards": [{"name": "math_accuracy"}], "rollout": spec}}
    path = write_recipe(tmp_path, "some/model", stages, data={"prompts": {"path": "prompts.jsonl"}})
    seen = {}
    monkeypatch.setattr(rollout, "make_engine", lambda backend, model_path, **kwargs: seen.update(kwargs))
    ctx = StageContext(recipe=load_recipe(path), name="grpo", run_dir=tmp_path / "runs")
    ctx.rollout_engine(type("Policy", (), {"dtype": torch.float32})(), None, seed=0)
    assert seen.get("enforce_eager", "unset") == ("unset" if enforce_eager is None else enforce_eager)
    if enforce_eager is None:
        path.write_text(path.read_text().replace("backend: vllm", "backend: vllm\n      enforce_eager: maybe"))
        assert "stages.grpo.rollout.enforce_eager" in error_of(path)


def test_trl_args_are_typed_and_built_at_validate_time(tmp_path):
    """What the trainer would refuse at construction fails in validate, with the key and line; YAML 1.1's
    `1e-3` (a string) is the number the user meant."""
    recipe = load_recipe(write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "learning_rate: 1e-3")))
    assert recipe.stages["sft"].args["learning_rate"] == 1e-3 and isinstance(recipe.stages["sft"].args["learning_rate"], float)

    msg = error_of(write(tmp_path, GOOD.replace("max_steps: 3", "max_steps: ten")))
    assert "r.yaml:12: stages.sft.args.max_steps" in msg and "valid integer" in msg and "'ten'" in msg
    msg = error_of(write(tmp_path, GOOD.replace("beta: 0.1", "beta: high")))
    assert "r.yaml:17: stages.dpo.args.beta" in msg and "'high'" in msg

    grpo = GOOD + """\
  grpo:
    method: grpo
    from: sft
    data: [sft]
    rewards: [{name: math_accuracy}]
    rollout: {num_generations: 3}
    args: {per_device_train_batch_size: 4}
"""
    msg = error_of(write(tmp_path, grpo))
    assert "r.yaml:24: stages.grpo.args: GRPOConfig refuses these args" in msg
    assert "must be divisible by num_generations (3)" in msg


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_machine(tmp_path, monkeypatch, native):
    """`bf16: auto` becomes bf16 autocast only where the device computes bf16 natively (models.bf16_supported):
    in the trainer config and in the fingerprint's args alike."""
    from trl import SFTConfig

    from alignment import models
    from alignment.stages import StageContext, effective_args

    monkeypatch.setattr(models, "bf16_supported", lambda: native)
    recipe = load_recipe(write(tmp_path, GOOD.replace("max_steps: 3}", "max_steps: 3, bf16: auto}")))
    assert effective_args(recipe, "sft")["bf16"] is native
    assert StageContext(recipe=recipe, name="sft", run_dir=tmp_path / "runs" / "t").trl_config(SFTConfig).bf16 is native


def test_bf16_supported_reads_the_cpu_flags(monkeypatch):
    from alignment import models

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for flags, native in (("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)):
        monkeypatch.setattr(models.Path, "read_text", lambda self, flags=flags: f"flags\t\t: {flags}\n")
        assert models.bf16_supported() is native


OLD_PPO = """\
name: old-ppo
model: {name_or_path: some/model}
data:
  prompts: {path: prompts.jsonl}
stages:
  ppo:
    method: ppo
    data: [prompts]
    rewards: [{name: math_accuracy}]
    rollout: {num_generations: 4}
    args:
      batch_size: 8
      num_minibatches: 2
      micro_batch_size: 4
      adam_eps: 1.0e-6
"""


def test_renamed_ppo_args_are_read_under_their_new_names_with_a_warning(tmp_path, capsys):
    """alignkit's PPO args before TRL's names (batch_size prompts, num_minibatches, micro_batch_size, adam_eps):
    an old recipe trains the same rollout (8 prompts x 4 = 32 sequences, 2 minibatches of 16, micro batches of 4)
    and each rewrite is told with its line."""
    p = write(tmp_path, OLD_PPO)
    args = load_recipe(p).stages["ppo"].args
    assert args == {"num_mini_batches": 2, "adam_epsilon": 1.0e-6, "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 4}
    from alignment.stages.ppo import PPOConfig

    assert PPOConfig(**args).rollout_size == 8 * 4
    err = capsys.readouterr().err
    assert f"{p}:13: stages.ppo.args.num_minibatches: 'num_minibatches' is now 'num_mini_batches'" in err
    assert f"{p}:12: stages.ppo.args.batch_size:" in err and "gradient_accumulation_steps: 4" in err


def test_old_and_new_ppo_names_together_are_not_rewritten(tmp_path):
    p = write(tmp_path, OLD_PPO.replace("      adam_eps: 1.0e-6\n", "      adam_eps: 1.0e-6\n      adam_epsilon: 1.0e-6\n"))
    assert "unknown PPOConfig argument 'adam_eps' (did you mean 'adam_epsilon'?)" in error_of(p)


@pytest.mark.parametrize("method, args, key, says", [
    ("dpo", "loss_type: hinge2", "loss_type", "unknown DPOConfig.loss_type 'hinge2' (did you mean 'hinge'?)"),
    ("dpo", "loss_type: [sigmoid, sfft]", "loss_type", "unknown DPOConfig.loss_type 'sfft' (did you mean 'sft'?)"),
    ("kto", "loss_type: sigmoid", "loss_type", "unknown KTOConfig.loss_type 'sigmoid'; one of: kto, apo_zero_unpaired"),
    ("sft", "loss_type: nlll", "loss_type", "unknown SFTConfig.loss_type 'nlll' (did you mean 'nll'?)"),
    ("sft", "{packing: true, packing_strategy: best}", "packing_strategy", "unknown SFTConfig.packing_strategy 'best'"),
    ("cpo", "loss_type: simpoo", "loss_type", "unknown CPOConfig.loss_type 'simpoo' (did you mean 'simpo'?)"),
    ("grpo", "loss_type: gspo", "loss_type", "unknown GRPOConfig.loss_type 'gspo'"),
    ("sft", "eval_strategy: steps", "eval_strategy", "needs an eval set during training"),
    ("dpo", "save_strategy: best", "save_strategy", "needs an eval set during training"),
    ("kto", "load_best_model_at_end: true", "load_best_model_at_end", "needs an eval set during training"),
])
def test_what_a_trainer_refuses_only_after_loading_is_refused_at_validate(tmp_path, method, args, key, says):
    """A value TRL checks only in its loss (an unknown loss_type: the first training step dies) or in the trainer's
    constructor (an eval strategy without an eval set) is refused by validate, with the key and its line."""
    assert_refused_at_validate(tmp_path, method, args, key, says)


def assert_refused_at_validate(tmp_path, method, args, key, says, start=""):
    """A stage `x` of `method` with `args` (a mapping's text, braces optional) after GOOD's stages is refused by
    load_recipe with `says`, naming `stages.x.args.KEY` and the args' line."""
    args = args if args.startswith("{") else "{" + args + "}"
    rewards = "    rewards: [{name: math_accuracy}]\n" if method == "grpo" else ""
    text = GOOD + f"  x:\n    method: {method}\n{start}    data: [sft]\n{rewards}    args: {args}\n"
    msg = error_of(write(tmp_path, text))
    line = text.splitlines().index(f"    args: {args}") + 1
    assert f"r.yaml:{line}: stages.x.args.{key}: " in msg and says in msg, msg


def test_every_documented_loss_type_is_accepted(tmp_path):
    from alignment.validate import CHOICES

    for (config, key), values in CHOICES.items():
        method = {"DPOConfig": "dpo", "GRPOConfig": "grpo"}[config]
        rewards = "    rewards: [{name: math_accuracy}]\n" if method == "grpo" else ""
        for value in values:
            if value in ("luspo", "vespo"):
                continue  # these need importance_sampling_level set to match
            extra = ", label_smoothing: 1.0e-3" if value == "exo_pair" else ""  # TrainerRule: exo_pair needs it
            load_recipe(write(tmp_path, GOOD + f"  x:\n    method: {method}\n    data: [sft]\n{rewards}    args: {{loss_type: {value}{extra}}}\n"))


@pytest.mark.parametrize("method, args, key, says", [
    ("dpo", "sync_ref_model: true", "sync_ref_model", "with an adapter the reference is the model with the adapter"),
    ("kto", "{sync_ref_model: true, precompute_ref_log_probs: true}", "sync_ref_model", "cannot be precomputed"),
    ("grpo", "{sync_ref_model: true, beta: 0.0}", "sync_ref_model", "with beta 0: there is no reference model"),
    ("dpo", "loss_type: exo_pair", "loss_type", "exo_pair needs label_smoothing > 0"),
    ("dpo", "{loss_type: apo_zero, f_divergence_type: js_divergence}", "f_divergence_type", "works only with loss_type"),
    ("dpo", "{loss_type: aot, use_weighting: true}", "use_weighting", "not implemented for loss_type aot"),
    ("kto", "per_device_train_batch_size: 1", "per_device_train_batch_size", "needs per_device_train_batch_size > 1"),
    ("kto", "train_sampling_strategy: random", "train_sampling_strategy", "needs train_sampling_strategy sequential"),
])
def test_what_a_trainer_refuses_in_its_constructor_is_refused_at_validate(tmp_path, method, args, key, says):
    """TRL's trainers check these in their constructors, on the config (and whether there is an adapter) alone --
    after the model loaded, as a traceback and advice to rerun; validate names the key and line first."""
    assert_refused_at_validate(tmp_path, method, args, key, says, start="    from: sft\n")


def test_eval_args_are_typed_as_the_task_takes_them(tmp_path):
    """YAML 1.1 reads `temperature: 1e-1` as a string: an eval arg is the number the user meant (it reached the
    task as text, after training); a value the task's type refuses is an error with the eval's line."""
    evals = "evals:\n  - {task: accuracy, data: sft, args: {temperature: 1e-1, num_samples: 4, k: [1, 2]}}\n"
    recipe = load_recipe(write(tmp_path, GOOD + evals))
    assert recipe.evals[0].args == {"temperature": 0.1, "num_samples": 4, "k": [1, 2]}
    assert isinstance(recipe.evals[0].args["temperature"], float)
    p = write(tmp_path, GOOD + evals.replace("temperature: 1e-1", "temperature: warm"))
    msg = error_of(p)
    assert f"{p}:19: evals.0.args: eval 'accuracy': temperature: input should be a valid number" in msg and "'warm'" in msg


def test_lists_of_numbers_in_trl_args_are_typed_too(tmp_path):
    """DPOConfig.loss_weights is `list[float]`: `[1e0, 5e-1]` (YAML 1.1 strings) are the numbers meant (the loss
    multiplied a tensor by a string at the first step); a word there is refused with the key and line."""
    dpo = GOOD.replace("args: {beta: 0.1}", "args: {beta: 0.1, loss_type: [sigmoid, sft], loss_weights: [1e0, 5e-1]}")
    recipe = load_recipe(write(tmp_path, dpo))
    assert recipe.stages["dpo"].args["loss_weights"] == [1.0, 0.5]
    msg = error_of(write(tmp_path, dpo.replace("5e-1", "heavy")))
    assert "r.yaml:17: stages.dpo.args.loss_weights: input should be a valid number" in msg and "'heavy'" in msg


@pytest.mark.parametrize("method, arg, says", [
    ("grpo", "temperature: 0.3", "set it under the stage's `rollout:` as `temperature:`"),
    ("rloo", "max_completion_length: 32", "set it under the stage's `rollout:` as `max_new_tokens:`"),
    ("online_dpo", "top_p: 0.9", "set it under the stage's `rollout:` as `top_p:`"),
    ("grpo", "use_vllm: true", "TRL's own generation setting"),
    ("grpo", "generation_kwargs: {min_p: 0.1}", "TRL's own generation setting"),
])
def test_generation_settings_under_args_of_a_generating_stage_are_refused(tmp_path, method, arg, says):
    """alignkit's engine samples with `rollout:`; the same setting under `args` reached only the trainer (GRPO's
    log-probs at temperature 0.3 of completions sampled at 1.0), silently."""
    text = GOOD + f"  x:\n    method: {method}\n    data: [sft]\n    rewards: [{{name: math_accuracy}}]\n    args: {{{arg}}}\n"
    msg = error_of(write(tmp_path, text))
    line = text.splitlines().index(f"    args: {{{arg}}}") + 1
    assert f"r.yaml:{line}: stages.x.args.{arg.split(':')[0]}: {says}" in msg, msg


@pytest.mark.parametrize("old, new, line", [
    ("  dpo:\n", "  ../../outside:\n", 13),          # a stage folder outside the run directory
    ("  dpo:\n", "  \"<b>dpo</b>\":\n", 13),          # markup in the report
    ("  pairs: {path", "  my pairs: {path", 7),        # a data set name with a space
])
def test_stage_and_data_names_are_folder_names(tmp_path, old, new, line):
    p = write(tmp_path, GOOD.replace(old, new))
    msg = error_of(p)
    assert f"{p}:{line}" in msg and "letters, digits, '_', '.', '-'" in msg and "[key]" not in msg
