"""The run directory `runs/NAME/`: the one module that knows its layout and reads and writes its files.

    recipe.yaml              the resolved recipe (all defaults filled)
    .lock                    held by the `alignkit run` using the directory
    STAGE/manifest.json      status (running | done | failed), fingerprint, inputs, trainer config, metrics
    STAGE/result.json        what the stage's process reports back: final metrics, info, trainer config
    STAGE/error.json         what the stage's process refused (its recipe or data), when it did
    STAGE/checkpoints/       trainer checkpoints (`checkpoint-STEP`, HF Trainer's naming), used to resume
    STAGE/model/             the artifact: adapter or full weights + tokenizer + alignkit_model.json
    STAGE/merged/            an adapter artifact merged into its base, made once on first use
    STAGE/metrics.jsonl      one JSON line per logging step
    evals/STAGE.json         eval results of base or a stage
    report/                  index.html, report.md and plots

A stage is done when its manifest says so *and* its artifact is present. JSON files are written
atomically (temp file, fsync, rename); an artifact is saved into a temp folder that is renamed into
place once complete, with `alignkit_model.json` (kind, base, head) beside the weights. How models
are loaded and adapters merged is `alignment.models`'s business.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from alignment.models import ARTIFACT_FILE, file_lock, merge_adapter, portable_path, read_artifact, resolve_model_path
from alignment.recipe import BASE, Recipe, dump_recipe, parse_resolved

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MANIFEST_ESSENTIALS = ("stage", "method", "status", "fingerprint", "exit_code", "error")  # what a full disk keeps


class DiskFull(OSError):
    """No space left (or the quota is reached) while writing into the run directory: one line for the CLI."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror, str(path))

    def __str__(self) -> str:
        return (f"no space left on the device while writing {self.filename} ({self.strerror}); free some space and "
                f"run again: done stages are kept and a cut-off stage resumes from its last complete checkpoint")


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None when the file is missing or unreadable (e.g. cut off)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old file or the new one, never half of one.

    Raises:
        DiskFull: no space left (the old file, if any, is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise DiskFull(path, err) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    with contextlib.suppress(OSError):
        dirfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dirfd)
        os.close(dirfd)


def write_json_atomic(path: Path, obj) -> None:
    """`write_text_atomic` of `obj` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


@contextlib.contextmanager
def artifact_writer(out: Path, *, kind: str, base: Optional[str], head: str, main: bool = True) -> Iterator[Path]:
    """Save an artifact into `out` atomically: the caller saves weights and tokenizer into the yielded (empty)
    temp folder; when the block ends without error, the main process writes `alignkit_model.json` and renames the
    folder to `out` (replacing an older one). Other ranks (`main=False`) only join a collective save.

    Args:
        out: the artifact folder (e.g. `STAGE/model`).
        kind: "adapter" (a peft adapter over `base`) or "full" (all weights).
        base: full-weights folder or hub id the adapter was trained on; a folder in the same run directory
            (`out` is `RUN/STAGE/model`) is recorded relative to `out` (`models.portable_path`), here and in peft's
            adapter_config.json, so a moved or copied run directory keeps its lineage.
        head: "causal_lm" or "sequence_classification" (a reward model).
    """
    tmp = out.with_name(out.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if main:
            _finish_artifact(tmp, out, kind=kind, base=base, head=head)
    except BaseException:
        if main:  # a save cut off (a full disk, an error): leave nothing half-written, and free its space
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_artifact(tmp: Path, out: Path, *, kind: str, base: Optional[str], head: str) -> None:
    """Record the lineage (`portable_path`, also in peft's adapter_config.json), then rename `tmp` to `out`."""
    root = out.parent.parent
    adapter_config = tmp / "adapter_config.json"
    if adapter_config.exists():
        config = json.loads(adapter_config.read_text())
        written = config.get("base_model_name_or_path")
        config["base_model_name_or_path"] = portable_path(written, out, root=root)
        adapter_config.write_text(json.dumps(config, indent=2))
        card = tmp / "README.md"  # peft's model card names the base too (`base_model: ...`)
        if written and card.exists():
            card.write_text(card.read_text().replace(written, config["base_model_name_or_path"]))
    meta = {"kind": kind, "base": portable_path(base, out, root=root), "head": head}
    (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def full_weights(model_dir: Path) -> Path:
    """A folder of full weights for an artifact: `model_dir` itself, or `merged/` beside it -- the adapter
    merged into its base (in float32) once, under a lock so that concurrent readers wait for it."""
    model_dir = Path(model_dir)
    meta = read_artifact(model_dir)
    if meta["kind"] == "full":
        return model_dir
    merged = model_dir.with_name("merged")
    if (merged / ARTIFACT_FILE).exists():
        return merged
    with file_lock(model_dir.with_name("merged.lock")):
        if not (merged / ARTIFACT_FILE).exists():
            model, tokenizer = merge_adapter(model_dir)
            with artifact_writer(merged, kind="full", base=meta["base"], head=meta["head"]) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    return merged


CHECKPOINT_STATE = "trainer_state.json"  # the last file HF Trainer (and PPO's save) writes into a checkpoint


def checkpoint_complete(folder: Path) -> bool:
    """Whether a checkpoint was written to the end: transformers' Trainer writes `trainer_state.json` after the
    weights, optimizer, scheduler and RNG states (PPO's `save` does the same), so a folder without it -- or with
    a cut-off one -- was interrupted while saving (kill -9, a full disk) and must not be resumed from."""
    return read_json(Path(folder) / CHECKPOINT_STATE) is not None


class RunDir:
    """One run directory (see the module docstring); `path` is `runs/NAME`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # ------------------------------------------------------------ layout

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def model_dir(self, name: str) -> Path:
        return self.stage_dir(name) / "model"

    def checkpoint_dir(self, name: str) -> Path:
        return self.stage_dir(name) / "checkpoints"

    def metrics_file(self, name: str) -> Path:
        return self.stage_dir(name) / "metrics.jsonl"

    def eval_file(self, stage: str) -> Path:
        return self.path / "evals" / f"{stage}.json"

    def _manifest_file(self, name: str) -> Path:
        return self.stage_dir(name) / "manifest.json"

    def _result_file(self, name: str) -> Path:
        return self.stage_dir(name) / "result.json"

    # ------------------------------------------------------------ recipe, manifest, result, evals

    def write_recipe(self, recipe: Recipe) -> None:
        write_text_atomic(self.recipe_file, dump_recipe(recipe))

    def read_recipe(self) -> Recipe:
        return parse_resolved(self.recipe_file.read_text())

    def read_manifest(self, name: str) -> Optional[dict]:
        return read_json(self._manifest_file(name))

    def write_manifest(self, name: str, manifest: dict) -> None:
        """Write STAGE/manifest.json atomically; paths into the run directory are stored relative to it.

        On a full disk (no room for the temp file) the file is overwritten in place with its essentials -- stage,
        method, status, fingerprint, exit code, error -- which fit in the blocks the old one holds, so it never
        goes on saying `running` and a rerun still resumes under the same fingerprint; then the error is raised.

        Raises:
            DiskFull: the disk (or quota) is full.
        """
        try:
            write_json_atomic(self._manifest_file(name), self.relative(manifest))
        except DiskFull:
            essentials = {k: manifest[k] for k in MANIFEST_ESSENTIALS if k in manifest}
            with contextlib.suppress(OSError), open(self._manifest_file(name), "r+") as fh:
                fh.write(json.dumps(essentials, default=str))
                fh.truncate()
            raise

    def relative(self, obj):
        """`obj` (JSON-like) with every string that is a path into the run directory made relative to it, so a
        moved or copied run directory names no old location."""
        if isinstance(obj, dict):
            return {k: self.relative(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.relative(v) for v in obj]
        root = str(self.path.resolve())
        if isinstance(obj, str) and (obj == root or obj.startswith(root + os.sep)):
            return os.path.relpath(obj, root)
        return obj

    def done(self, name: str) -> Optional[dict]:
        """The stage's manifest when it says done and the artifact is present, else None."""
        man = self.read_manifest(name)
        if man and man.get("status") == "done" and self.model_dir(name).is_dir():
            return man
        return None

    def read_result(self, name: str) -> Optional[dict]:
        return read_json(self._result_file(name))

    def write_result(self, name: str, result: dict) -> None:
        write_json_atomic(self._result_file(name), self.relative(result))

    def clear_result(self, name: str) -> None:
        """Remove what a previous attempt of the stage reported (result.json, error.json)."""
        self._result_file(name).unlink(missing_ok=True)
        self._error_file(name).unlink(missing_ok=True)

    def _error_file(self, name: str) -> Path:
        return self.stage_dir(name) / "error.json"

    def write_error(self, name: str, message: str) -> None:
        """What the stage's process refused (its recipe or data), for the orchestrator's manifest."""
        write_json_atomic(self._error_file(name), {"error": message})

    def read_error(self, name: str) -> Optional[str]:
        return (read_json(self._error_file(name)) or {}).get("error")

    def read_evals(self, stage: str) -> Optional[dict]:
        return read_json(self.eval_file(stage))

    def write_evals(self, stage: str, results: dict) -> None:
        write_json_atomic(self.eval_file(stage), results)

    # ------------------------------------------------------------ models

    def weights(self, recipe: Recipe, name: str) -> str:
        """A folder (or hub id) of full weights for `base` or a finished stage of this run."""
        if name == BASE:
            return resolve_model_path(recipe.model.name_or_path)
        return str(full_weights(self.model_dir(name)))

    def artifact_writer(self, name: str, *, kind: str, base: Optional[str], head: str, main: bool = True):
        """`artifact_writer` into the stage's `model/` folder."""
        return artifact_writer(self.model_dir(name), kind=kind, base=base, head=head, main=main)

    def checkpoints(self, name: str, *, complete: bool = True) -> list[Path]:
        """The stage's checkpoint folders, oldest first: only complete ones (`checkpoint_complete`), or
        with `complete=False` every one, a folder cut off while it was being written included."""
        folder = self.checkpoint_dir(name)
        found = [p for p in folder.glob("checkpoint-*") if _CHECKPOINT.match(p.name) and p.is_dir()] if folder.is_dir() else []
        if complete:
            found = [p for p in found if checkpoint_complete(p)]
        return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))

    def checkpoint(self, name: str, step: int) -> Path:
        return self.checkpoint_dir(name) / f"checkpoint-{step}"

    # ------------------------------------------------------------ metrics

    def append_metrics(self, name: str, step: int, values: dict) -> None:
        """One line `{"step", "time" (unix seconds), **values}` at the end of STAGE/metrics.jsonl."""
        path = self.metrics_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def read_metrics(self, name: str) -> list[dict]:
        """Every logged row of the stage, in order ([] when nothing was logged)."""
        path = self.metrics_file(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, name: str, step: int) -> None:
        """Drop rows logged after `step` (a run cut off after its last checkpoint, about to resume from it)."""
        path = self.metrics_file(name)
        if path.exists():
            keep = [row for row in self.read_metrics(name) if row.get("step", 0) <= step]
            path.write_text("".join(json.dumps(row) + "\n" for row in keep))
