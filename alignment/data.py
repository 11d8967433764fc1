"""Datasets: local jsonl / json / parquet / csv files or hub datasets, format checks, mixtures.

Every row is checked against the format a stage needs; a bad row is one `DataError` naming the
file, the line (jsonl, csv) or row number, and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from alignment.recipe import DataRef, DatasetConfig

# format name -> the columns that make it (first match wins, so the richer formats come first)
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "prompt": ("prompt",),
}


class DataError(ValueError):
    """A dataset that cannot be used: names the file and the row."""


@dataclass
class Loaded:
    """One dataset with a way back from row index to 'file:line' for error messages."""

    name: str
    rows: list[dict]
    source: str
    where: Callable[[int], str]


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )


def _text_or_messages(value) -> bool:
    return isinstance(value, str) or _is_messages(value)


# format -> column -> (check, what was expected)
ROW_CHECKS: dict[str, dict[str, tuple[Callable, str]]] = {
    "messages": {"messages": (_is_messages, "a non-empty list of {role, content} messages")},
    "preference": {
        "chosen": (_text_or_messages, "a string or a list of {role, content} messages"),
        "rejected": (_text_or_messages, "a string or a list of {role, content} messages"),
    },
    "unpaired": {
        "prompt": (_text_or_messages, "a string or a list of {role, content} messages"),
        "completion": (_text_or_messages, "a string or a list of {role, content} messages"),
        "label": (lambda v: isinstance(v, bool), "true or false"),
    },
    "prompt_completion": {
        "prompt": (_text_or_messages, "a string or a list of {role, content} messages"),
        "completion": (_text_or_messages, "a string or a list of {role, content} messages"),
    },
    "text": {"text": (lambda v: isinstance(v, str) and v != "", "a non-empty string")},
    "prompt": {"prompt": (_text_or_messages, "a string or a list of {role, content} messages")},
}


def detect_format(columns) -> Optional[str]:
    cols = set(columns)
    for fmt, needed in FORMATS.items():
        if set(needed) <= cols:
            return fmt
    return None


def file_digest(path: str) -> str:
    """sha256 of a local file (hub datasets: of their id + revision) -- part of a stage fingerprint."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(path.encode())
    return h.hexdigest()


def dataset_digest(cfg: DatasetConfig) -> str:
    """Content + options of a dataset; a local file's location is not part of it (moving a
    checkout must not invalidate finished stages)."""
    options = cfg.model_dump_json(exclude={"path"} if Path(cfg.path).is_file() else None)
    return file_digest(cfg.path) + ":" + hashlib.sha256(options.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def load(name: str, cfg: DatasetConfig) -> Loaded:
    """Read a dataset's rows (renamed, truncated); errors name the file and line."""
    path = Path(cfg.path)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and _looks_like_jsonl(path)):
        if not path.exists():
            raise DataError(f"dataset '{name}': file not found: {path}")
        rows, lines = _read_jsonl(path)
        where = lambda i: f"{path}:{lines[i]}"  # noqa: E731
    elif path.suffix in (".json", ".parquet", ".csv"):
        if not path.exists():
            raise DataError(f"dataset '{name}': file not found: {path}")
        rows = _read_table(path)
        offset = 2 if path.suffix == ".csv" else 1  # csv: header is line 1
        where = (lambda i: f"{path}:{i + offset}") if path.suffix == ".csv" else (lambda i: f"{path}: row {i + 1}")
    else:
        rows = _read_hub(cfg)
        where = lambda i: f"{cfg.path}[{cfg.split}]: row {i + 1}"  # noqa: E731
    if cfg.columns:
        rows = [{cfg.columns.get(k, k): v for k, v in r.items()} for r in rows]
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise DataError(f"dataset '{name}' ({cfg.path}) has no rows")
    loaded = Loaded(name, rows, str(cfg.path), where)
    if cfg.unpaired:
        loaded = to_unpaired(loaded)
    return loaded


def _looks_like_jsonl(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1).strip() or fh.readline().strip()[:1]
    return head == "{"


def _read_table(path: Path) -> list[dict]:
    import datasets

    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot read as {kind}: {e}") from None
    return ds.to_list()


def _read_hub(cfg: DatasetConfig) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as e:
        raise DataError(f"dataset {cfg.path!r}: not a local file and could not be loaded from the hub: {e}") from None
    return ds.to_list()


def to_unpaired(loaded: Loaded) -> Loaded:
    """chosen/rejected pairs -> (prompt, completion, label) rows, two per pair (for KTO)."""
    check(loaded, ("preference",))
    out, origin = [], []
    for i, row in enumerate(loaded.rows):
        prompt, chosen, rejected = split_prompt(row)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({**extra, "prompt": prompt, "completion": chosen, "label": True})
        out.append({**extra, "prompt": prompt, "completion": rejected, "label": False})
        origin += [i, i]
    return Loaded(loaded.name, out, loaded.source, lambda j: loaded.where(origin[j]))


def split_prompt(row: dict):
    """(prompt, chosen, rejected) with an explicit prompt, or the shared prefix when implicit."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        return row["prompt"], chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------- checks and mixtures


def check(loaded: Loaded, accept: tuple[str, ...]) -> str:
    """The dataset's format (one of `accept`); every row checked. Raises DataError."""
    fmt = detect_format(loaded.rows[0].keys())
    if fmt not in accept:
        wanted = " or ".join("/".join(FORMATS[f]) for f in accept)
        raise DataError(
            f"{loaded.where(0)}: dataset '{loaded.name}' has columns {sorted(loaded.rows[0])}; expected {wanted} "
            f"(rename columns with `columns: {{old: new}}` under data.{loaded.name})"
        )
    checks = ROW_CHECKS[fmt]
    for i, row in enumerate(loaded.rows):
        for col, (ok, expected) in checks.items():
            if col not in row:
                raise DataError(f"{loaded.where(i)}: column '{col}' is missing (dataset '{loaded.name}', format {fmt})")
            if not ok(row[col]):
                raise DataError(f"{loaded.where(i)}: column '{col}' should be {expected}, got {_short(row[col])}")
    return fmt


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def mixture(parts: list[tuple[list[dict], float]], seed: int) -> list[dict]:
    """Mix datasets by weight: each gets weight/sum(weights) of the total rows of all datasets
    (sampled without replacement while it has enough rows, repeated otherwise). Equal weights over
    one dataset, or all weights 1, is plain concatenation."""
    if all(w == 1.0 for _, w in parts):
        return [r for rows, _ in parts for r in rows]
    rng = random.Random(seed)
    total = sum(len(rows) for rows, _ in parts)
    wsum = sum(w for _, w in parts)
    out = []
    for rows, w in parts:
        k = round(total * w / wsum)
        picked = []
        while len(picked) < k:
            picked += rng.sample(rows, min(len(rows), k - len(picked)))
        out += picked
    rng.shuffle(out)
    return out


def build(datasets_cfg: dict[str, DatasetConfig], refs: list[DataRef], accept: tuple[str, ...], *, seed: int = 0):
    """A `datasets.Dataset` for a stage: load, check and mix its data refs.

    Columns beyond the format's are kept (rewards read them, e.g. `answer`); only columns present
    in every part of a mixture survive it.
    """
    import datasets

    if not refs:
        raise DataError("this stage has no data: add `data: [NAME]` naming a dataset under data:")
    parts, formats = [], set()
    for ref in refs:
        loaded = load(ref.name, datasets_cfg[ref.name])
        formats.add(check(loaded, accept))
        parts.append((loaded.rows, ref.weight))
    if len(formats) > 1:
        raise DataError(f"a mixture must share one format; got {sorted(formats)} from {[r.name for r in refs]}")
    common = set.intersection(*(set(rows[0]) for rows, _ in parts))
    rows = [{k: r.get(k) for k in common} for r in mixture(parts, seed)]
    if formats == {"preference"}:  # implicit prompts (shared prefix) become explicit ones
        rows = [{**r, **dict(zip(("prompt", "chosen", "rejected"), split_prompt(r)))} for r in rows]
    return datasets.Dataset.from_list(rows)
