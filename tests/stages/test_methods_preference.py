"""Reference-free preference stages on the tiny model: ORPO (LoRA), CPO (DoRA) and SimPO (CPO's `loss_type: simpo`,
QLoRA: nf4 on CPU) widen their own chosen-rejected reward margin on a fixed seed; the TRL classes they use are
pinned; a prompt-only dataset is refused with its file, line and needed columns."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from tests.helpers import losses, manifest, run_cli, write_jsonl, write_recipe

LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
MODELS = {"orpo": {}, "cpo": {"adapter": {**LORA, "method": "dora"}}, "simpo": {"quantization": {"bits": 4}}}
METHODS = tuple(MODELS)


def pairs(n: int = 32) -> list[dict]:
    """'a+b=' -> chosen the sum, rejected as many '?': equal lengths, so a random model starts near margin 0."""
    rows = []
    for i in range(n):
        a, b = i % 9 + 1, (i * 7) % 9 + 1
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}="}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": "?" * len(str(a + b))}]})
    return rows


def test_trl_experimental_classes_are_where_the_stages_import_them():
    """TRL's experimental API may move between versions: an upgrade that moves these fails here first."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: F401
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: F401

    assert "simpo" in CPOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
    assert {"cpo_alpha", "simpo_gamma"} <= set(CPOConfig.__dataclass_fields__)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("pref")
    write_jsonl(tmp / "pairs.jsonl", pairs())
    args = {"per_device_train_batch_size": 8, "save_steps": 100, "max_steps": 12, "learning_rate": 1e-2, "beta": 0.1}
    stages = {m: {"method": m, "data": ["pairs"], "args": args, **({"model": MODELS[m]} if MODELS[m] else {})}
              for m in METHODS}
    recipe = write_recipe(tmp, tiny_model_path, stages, data={"pairs": {"path": "pairs.jsonl"}},
                          model={"adapter": LORA})
    res = run_cli(recipe, "--run-dir", tmp / "runs")
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "t"


@pytest.mark.parametrize("method, objective", [("orpo", "log_odds_ratio"), ("cpo", "rewards/margins"),
                                               ("simpo", "rewards/margins")])
def test_own_objective_rises_and_loss_falls(run_dir, method, objective):
    """ORPO's odds-ratio term, CPO's and SimPO's reward margin (beta * the policy's own log-prob gap) rise."""
    curve, loss = losses(run_dir, method, objective), losses(run_dir, method, "loss")
    assert len(curve) == 12 and len(loss) == 12
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.03, curve
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, loss
    assert manifest(run_dir, method)["status"] == "done"


def test_simpo_is_cpo_with_simpos_defaults(run_dir):
    cpo, simpo = (manifest(run_dir, m)["trainer_config"] for m in ("cpo", "simpo"))
    assert (cpo["loss_type"], cpo["cpo_alpha"]) == ("sigmoid", 1.0)
    assert (simpo["loss_type"], simpo["cpo_alpha"]) == ("simpo", 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_prompt_only_data_is_refused_with_file_line_and_columns(tmp_path, tiny_model_path, method):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}] * 3)
    recipe = write_recipe(tmp_path, tiny_model_path, {"s": {"method": method, "data": ["p"]}},
                          data={"p": {"path": "prompts.jsonl"}})
    res = CliRunner().invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"{data}:1:" in out and "expected chosen/rejected" in out, out


def test_alignkit_list_shows_the_new_methods_with_their_formats():
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    shown = {line.split()[0]: line.split()[1:] for line in res.output.splitlines() if line.startswith("  ")}
    for method in METHODS:
        assert shown[method] == ["preference"], res.output
    for method in ("rloo", "online_dpo"):
        assert shown[method] == ["prompt"], res.output
