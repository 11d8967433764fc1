"""`bench/bench.py`'s SFT pair compares the same run on both sides: the TRL config alignkit's recipe builds
(`alignment.stages.trainer_kwargs`) and the one `bench/raw_trl.py` builds from its command line differ only in the
output folder and alignkit's checkpoint count (one checkpoint is written either way). A setting left to each side's
default was not the same run: TRL's SFTConfig checkpoints activations (gradient checkpointing) and alignkit does
not, which alone made alignkit's SFT peak 1.23x raw TRL's (bench/README.md, 2026-12-01 02:36)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"output_dir", "save_total_limit"}  # paths; alignkit keeps two checkpoints, TRL all (the bench writes one)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return _script("bench"), _script("raw_trl")


def _settings(tmp_path: Path, **over) -> dict:
    """`bench.settings` without building or converting a model: the configs read no weights."""
    from alignment.recipe import ModelConfig

    return {"model": str(tmp_path), "bf16": False, "save_steps": 1000, "sft_steps": 12, "sft_batch": 8,
            "gradient_checkpointing": ModelConfig.model_fields["gradient_checkpointing"].default, "rl_steps": 4,
            "num_generations": 8, "rollout_size": 64, "max_new_tokens": 16, "kl_coef": 0.05, **over}


def _sft_configs(scripts, tmp_path: Path, s: dict) -> tuple[dict, dict]:
    from trl import SFTConfig

    from alignment.stages import load_stages, trainer_kwargs
    from alignment.validate import load_recipe

    bench, raw = scripts
    argv = bench.cases(s, tmp_path)
    trl_side = raw.trainer_config(raw.parser().parse_args(argv["sft/trl"][2:])).to_dict()
    recipe_path = Path(argv["sft/alignkit"][argv["sft/alignkit"].index("run") + 1])
    load_stages()
    ours = SFTConfig(**trainer_kwargs(load_recipe(recipe_path), "sft", tmp_path / "checkpoints")).to_dict()
    return trl_side, ours


@pytest.mark.parametrize("checkpointing", [None, True])  # None: alignkit's default, what the bench uses
def test_both_sides_of_the_sft_bench_build_the_same_trl_config(scripts, tmp_path, checkpointing):
    from alignment.recipe import ModelConfig

    over = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    trl_side, ours = _sft_configs(scripts, tmp_path, _settings(tmp_path, **over))
    differ = {k: (trl_side.get(k), ours.get(k)) for k in trl_side.keys() | ours.keys() if trl_side.get(k) != ours.get(k)}
    assert differ.keys() <= ALLOWED, differ
    default = ModelConfig.model_fields["gradient_checkpointing"].default
    assert ours["gradient_checkpointing"] is (default if checkpointing is None else checkpointing)


def test_raw_trl_alone_keeps_trls_default_checkpointing(scripts):
    _bench, raw = scripts
    args = raw.parser().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--steps", "1", "--batch", "1",
                                    "--lr", "1e-3"])
    assert raw.trainer_config(args).gradient_checkpointing is True


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_rl_cases_checkpoint_alike_on_both_sides(scripts, tmp_path, checkpointing):
    import yaml

    bench, raw = scripts
    argv = bench.cases(_settings(tmp_path, gradient_checkpointing=checkpointing), tmp_path)
    assert raw.trainer_config(raw.parser().parse_args(argv["grpo/trl"][2:])).gradient_checkpointing is checkpointing
    for case in ("grpo/alignkit", "ppo/alignkit"):
        recipe = yaml.safe_load(Path(argv[case][argv[case].index("run") + 1]).read_text())
        assert recipe["model"]["gradient_checkpointing"] is checkpointing, case


def test_the_rl_cases_do_the_same_work_per_row(scripts, tmp_path):
    """Raw TRL GRPO, alignkit GRPO and PPO all hold a KL term to the reference with one coefficient, so each runs
    a reference forward, and alignkit's GRPO trains every row (SkipZeroAdvantageRows needs beta 0)."""
    import yaml

    bench, raw = scripts
    argv = bench.cases(_settings(tmp_path, kl_coef=0.07), tmp_path)
    assert raw.trainer_config(raw.parser().parse_args(argv["grpo/trl"][2:])).beta == 0.07
    stages = {case: yaml.safe_load(Path(argv[case][argv[case].index("run") + 1]).read_text())["stages"]
              for case in ("grpo/alignkit", "ppo/alignkit")}
    assert stages["grpo/alignkit"]["grpo"]["args"]["beta"] == stages["ppo/alignkit"]["ppo"]["args"]["kl_coef"] == 0.07
