"""The metrics vocabulary (alignment/metrics.py): TRL's keys renamed per method, templates, report panels."""
from __future__ import annotations

from alignment.metrics import METRICS, PANELS, PROGRESS, TRL_NAMES, describe, rename
from evals.report import curve_panels


def test_grpo_keys_are_renamed_and_others_kept():
    logs = {"loss": 0.5, "reward": 0.25, "reward_std": 0.1, "rewards/math_accuracy/mean": 0.2, "kl": 0.01,
            "completions/mean_length": 7.0, "clip_ratio/low_min": 0.0}
    assert rename("grpo", logs) == {"loss": 0.5, "reward/mean": 0.25, "reward/std": 0.1,
                                    "reward/math_accuracy/mean": 0.2, "kl/ref_per_token": 0.01,
                                    "response/length_mean": 7.0, "clip_ratio/low_min": 0.0}
    # kto's `kl` is per sequence; other methods keep TRL's names
    assert rename("kto", {"kl": 2.0}) == {"kl/ref": 2.0}
    assert rename("dpo", {"kl": 2.0, "rewards/margins": 1.0}) == {"kl": 2.0, "rewards/margins": 1.0}


def test_every_renamed_key_is_declared_once_with_a_known_panel():
    targets = [ours.replace("<fn>", "f") for table in TRL_NAMES.values() for ours in table.values()]
    assert [k for k in targets if describe(k) is None] == []
    assert {m.panel for m in METRICS.values()} - {None} <= set(PANELS)
    assert [k for k in PROGRESS if describe(k) is None] == []


def test_templates_match_instances_only():
    assert describe("reward/sevens/mean") is METRICS["reward/<fn>/mean"]
    assert describe("timing/generate") is METRICS["timing/<phase>"]
    assert describe("reward/mean") is METRICS["reward/mean"]
    assert describe("clip_ratio/low_min") is None


def test_report_panels_read_declared_keys_only():
    rows = [{"step": s, "time": 1.0 + s, "loss": 1.0 / s, "reward/mean": 0.1 * s, "reward/f/mean": 0.2 * s,
             "kl/ref": 0.01 * s, "timing/step": 2.0, "clip_ratio/low_min": 0.0, "train_loss": 0.3} for s in (1, 2)]
    assert curve_panels(rows) == [("loss", ["loss"]), ("reward", ["reward/mean", "reward/f/mean"]),
                                  ("KL", ["kl/ref"])]


def test_the_plain_progress_prints_one_line_per_step(capsys):
    """A trainer logs its closing row of `train_*` totals at the last step again: no second line for that step."""
    from alignment.stages import Progress

    progress = Progress("sft", total=2)
    assert progress.plain  # pytest's captured stdout is not a terminal
    for step in (1, 2):
        progress.update(step)  # on_step_end
        progress.update(step, {"loss": 4.0 - step, "grad_norm": 1.0})  # on_log
    progress.update(2, {"train_loss": 2.5, "train_runtime": 7.9})  # the trainer's closing row
    progress.stop()
    assert capsys.readouterr().out.splitlines() == ["  sft step 1/2 loss 3", "  sft step 2/2 loss 2"]


def test_a_resumed_stage_train_loss_weights_each_logged_window_by_its_steps():
    from alignment.stages import stage_train_loss

    rows = [{"step": 2, "loss": 4.0}, {"step": 4, "loss": 2.0}, {"step": 4, "train_loss": 9.0},  # a cut-off run's closing row
            {"step": 6, "loss": 1.0}]  # logged after the checkpoint at 5, then cut off: dropped at the resume
    # steps 1-4 logged (window 2 each), step 5 not; the resumed process ran 6-8 at a mean of 1.0
    assert stage_train_loss(rows, 5, {"train_loss": 1.0}, 8) == {"train_loss": (4 * 2 + 2 * 2 + 1.0 * 3) / 7}
    assert stage_train_loss(rows, 4) == {"train_loss": 3.0}  # resumed at the last step: only weights loaded
    assert stage_train_loss(rows, 0, {"train_loss": 1.0}, 8) == {}  # not resumed: transformers' own stands
