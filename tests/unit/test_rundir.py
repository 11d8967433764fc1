"""The run directory: atomic manifests, done = manifest done + artifact, atomic artifacts, metrics resume."""
from __future__ import annotations

import json

import pytest

from alignment import rundir as rundir_module
from alignment.models import ARTIFACT_FILE
from alignment.rundir import RunDir, full_weights


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.write_manifest("sft", {"status": "running", "fingerprint": "a"})

    def crash(fd):  # the new file written, not yet synced (an I/O error, a kill)
        raise OSError("I/O error")

    monkeypatch.setattr(rundir_module.os, "fsync", crash)
    with pytest.raises(OSError):
        rd.write_manifest("sft", {"status": "done", "fingerprint": "b"})
    monkeypatch.undo()
    assert rd.read_manifest("sft") == {"status": "running", "fingerprint": "a"}  # the old one, whole
    assert sorted(p.name for p in rd.stage_dir("sft").iterdir()) == ["manifest.json"]  # no temp file left


def test_done_needs_the_manifest_and_the_artifact(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.done("sft") is None  # nothing yet
    rd.write_manifest("sft", {"status": "done", "fingerprint": "f"})
    assert rd.done("sft") is None  # says done, but no model/
    rd.model_dir("sft").mkdir(parents=True)
    assert rd.done("sft") == {"status": "done", "fingerprint": "f"}
    rd.write_manifest("sft", {"status": "running", "fingerprint": "f"})
    assert rd.done("sft") is None


def test_artifact_appears_whole_or_not_at_all(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.artifact_writer("sft", kind="full", base=None, head="causal_lm") as tmp:
        (tmp / "weights.bin").write_text("v1")
    model = rd.model_dir("sft")
    assert (model / "weights.bin").read_text() == "v1"
    assert json.loads((model / ARTIFACT_FILE).read_text()) == {"kind": "full", "base": None, "head": "causal_lm"}
    assert full_weights(model) == model  # full weights are their own full weights

    with pytest.raises(RuntimeError):
        with rd.artifact_writer("sft", kind="adapter", base="/b", head="causal_lm") as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("killed while saving")
    assert (model / "weights.bin").read_text() == "v1"  # the finished artifact is untouched


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    rd = RunDir(tmp_path / "run")
    for step in range(1, 6):
        rd.append_metrics("ppo", step, {"loss": 1.0 / step})
    rd.truncate_metrics("ppo", 3)
    rd.append_metrics("ppo", 4, {"loss": 0.3})  # the resumed run logs step 4 again
    rows = rd.read_metrics("ppo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == 0.5 and rows[3]["loss"] == 0.3 and isinstance(rows[0]["time"], float)


def test_checkpoints_sorted_by_step(tmp_path):
    rd = RunDir(tmp_path / "run")
    for step in (10, 2, 30):
        rd.checkpoint("sft", step).mkdir(parents=True)
        (rd.checkpoint("sft", step) / "trainer_state.json").write_text('{"global_step": %d}' % step)
    (rd.checkpoint_dir("sft") / "checkpoint-x").mkdir()  # not a checkpoint
    assert [p.name for p in rd.checkpoints("sft")] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert RunDir(tmp_path / "other").checkpoints("sft") == []


def test_a_checkpoint_cut_off_while_saving_does_not_count(tmp_path):
    rd = RunDir(tmp_path / "run")
    for step in (5, 10, 15):
        rd.checkpoint("sft", step).mkdir(parents=True)
        (rd.checkpoint("sft", step) / "model.safetensors").write_bytes(b"weights")
    (rd.checkpoint("sft", 5) / "trainer_state.json").write_text('{"global_step": 5}')
    (rd.checkpoint("sft", 10) / "trainer_state.json").write_text('{"global_step": 10')  # cut off mid-write
    # 15: killed before its state was written
    assert [p.name for p in rd.checkpoints("sft")] == ["checkpoint-5"]
    assert [p.name for p in rd.checkpoints("sft", complete=False)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]


# ---------------------------------------------------------------- a full disk (issue 17, point 3)


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_manifest_failed_not_running_and_says_so_in_one_line(tmp_path, monkeypatch):
    import json

    from alignment.rundir import DiskFull, RunDir

    rundir = RunDir(tmp_path / "run")
    running = {"stage": "sft", "method": "sft", "status": "running", "fingerprint": "abc",
               "inputs": {"args": {"x": 1}}, "versions": {"torch": "2"}}
    rundir.write_manifest("sft", running)
    monkeypatch.setattr("alignment.rundir.os.replace", _disk_full)
    with pytest.raises(DiskFull) as exc:
        rundir.write_manifest("sft", {**running, "status": "failed", "exit_code": 1, "seconds": 3.0})
    assert str(exc.value) == (f"no space left on the device while writing {rundir.stage_dir('sft') / 'manifest.json'} "
                              f"(No space left on device); free some space and run again: done stages are kept and a "
                              f"cut-off stage resumes from its last complete checkpoint")
    assert json.loads((rundir.stage_dir("sft") / "manifest.json").read_text()) == {
        "stage": "sft", "method": "sft", "status": "failed", "fingerprint": "abc", "exit_code": 1}
    assert [p.name for p in rundir.stage_dir("sft").iterdir()] == ["manifest.json"]  # no temp file left


def test_an_artifact_cut_off_while_saving_leaves_nothing_that_looks_finished(tmp_path):
    from alignment.rundir import RunDir

    rundir = RunDir(tmp_path / "run")
    with pytest.raises(OSError):
        with rundir.artifact_writer("sft", kind="full", base=None, head="causal_lm") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            _disk_full()
    assert not rundir.model_dir("sft").exists() and not list(rundir.stage_dir("sft").iterdir())
