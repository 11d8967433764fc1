"""alignment/hub.py: with the hub unreachable and HF_HUB_OFFLINE unset, planning asks the hub once and says so,
instead of huggingface_hub's ~23 s of retries per file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import sum_rows, write_jsonl, write_recipe

ROOT = Path(__file__).parents[2]
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


@pytest.fixture
def hub_unreachable(monkeypatch):
    """This process as on a machine without network where HF_HUB_OFFLINE is not set; every back-off sleep of
    huggingface_hub's retries recorded (and cut short)."""
    import huggingface_hub.utils._http as http
    from huggingface_hub import constants

    from alignment import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", NOWHERE)
    sleeps = []
    monkeypatch.setattr(http.time, "sleep", sleeps.append)
    hub.unreachable.cache_clear()
    yield sleeps
    hub.unreachable.cache_clear()


def test_a_hub_config_the_hub_cannot_give_fails_after_one_try(hub_unreachable):
    from alignment.memory import PlanError, find_config

    with pytest.raises(PlanError, match=r"the hub did not answer \(ConnectError; one try, 5 s timeout\)"):
        find_config("alignkit-tests/no-such-model")
    assert hub_unreachable == []  # no retries


def test_plan_of_a_recipe_with_hub_data_asks_the_hub_once(tmp_path, tiny_model_path):
    write_jsonl(tmp_path / "sft.jsonl", sum_rows(4))
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft", "hub"]}},
                          data={"sft": {"path": "sft.jsonl"}, "hub": {"path": "alignkit-tests/no-such-set"},
                                "test": {"path": "test.jsonl"}},
                          evals=[{"task": "accuracy", "data": "test"}])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": NOWHERE, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "alignment.cli", "plan", str(recipe), "--run-dir", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Retrying in" not in out.stderr  # huggingface_hub's back-off: 1 + 2 + 4 + 8 + 8 s
    said = " ".join(out.stdout.split())
    assert "decontamination: not checked (dataset 'alignkit-tests/no-such-set': not a local file" in said
    assert "the hub did not answer (ConnectError; one try, 5 s timeout)" in said and "HF_HUB_OFFLINE=1" in said
