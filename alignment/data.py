"""Datasets: local jsonl / json / parquet / csv files or hub datasets, format checks, mixtures.

Every row is checked against the format a stage needs. A malformed row (a missing, null or empty
text, an unknown role, a conversation that does not end with the assistant, ...) is one line of a
`DataError` naming the file, the line (jsonl, csv) or row number and what was expected -- or, under
the recipe's `on_bad_rows: drop | warn`, left out. Nothing changes without a word: every row that is
dropped, retyped (a number in a text column), split (an implicit prompt) or truncated (`max_length`)
is counted per dataset in a `DataReport`, with its first few file:line.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import weakref
from dataclasses import dataclass, field
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
# Columns a format defines as text (or a conversation): a CSV cell `7` there is the text "7".
TEXT_COLUMNS = ("prompt", "completion", "text", "chosen", "rejected")
# Message roles of HF chat templates; anything else (`robot`, `bot`, `human`) is a typo or another schema.
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(ValueError):
    """A dataset that cannot be used: names the file and the row."""


# ---------------------------------------------------------------- the report

# kind -> what happened to a row of that kind (the kinds of DataReport)
CHANGES: dict[str, str] = {
    "dropped": "malformed, left out (on_bad_rows)",
    "retyped": "a number in a text column, read as text",
    "split": "no `prompt` column: the prompt is the shared start of chosen/rejected, cut at a word boundary",
    "truncated": "completion cut away completely by max_length (nothing left to learn from)",
    "truncated_partly": "cut by max_length (part of the completion or text lost)",
    "too_long": "longer than max_length: the trainer leaves it out",
    "system_prompt": "the dataset's system_prompt put first in its conversation",
    "contaminated": "shares an n-gram with an eval set, left out (decontaminate: drop)",
    "overlapping": "shares an n-gram with an eval set, kept (decontaminate: warn)",
}
EXAMPLES = 3  # file:line examples kept per dataset and kind
TRUNCATION = ("truncated", "truncated_partly", "too_long")


@dataclass
class DataReport:
    """Rows changed on the way to a trainer, per dataset: counts per kind (`CHANGES`) and the first
    `EXAMPLES` 'file:line: why' of each. `lines()` is what validate and the stages print,
    `to_dict()` the JSON for a stage's manifest: {dataset: {kind: {"rows": n, "examples": [...]}}}."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def add(self, dataset: str, kind: str, where: str, why: str = "") -> None:
        counts = self.counts.setdefault(dataset, {})
        counts[kind] = counts.get(kind, 0) + 1
        shown = self.examples.setdefault(dataset, {}).setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(f"{where}: {why}" if why else where)

    def rows(self, kind: str) -> int:
        """Rows of `kind` over all datasets."""
        return sum(c.get(kind, 0) for c in self.counts.values())

    def lines(self, kinds: tuple[str, ...] = tuple(CHANGES)) -> list[str]:
        out = []
        for dataset, counts in self.counts.items():
            for kind, n in ((k, n) for k, n in counts.items() if k in kinds):
                shown = "; ".join(self.examples[dataset][kind])
                out.append(f"dataset '{dataset}': {n} row(s) {kind} -- {CHANGES[kind]}; e.g. {shown}")
        return out

    def to_dict(self) -> dict:
        return {d: {k: {"rows": n, "examples": self.examples[d][k]} for k, n in c.items()} for d, c in self.counts.items()}


def bad_row_policy(on_bad_rows: Optional[str], kind: str) -> str:
    """error | drop | warn for rows of `kind` ('malformed' or 'truncated'): the recipe's
    `on_bad_rows`, else error for malformed rows and warn for truncated ones."""
    return on_bad_rows or ("warn" if kind == "truncated" else "error")


@dataclass
class Loaded:
    """One dataset with a way back from row index to 'file:line' for error messages."""

    name: str
    rows: list[dict]
    source: str
    where: Callable[[int], str]


# ---------------------------------------------------------------- row checks: None = fine, else what is wrong


def _text_problem(value) -> Optional[str]:
    if value is None:
        return "is null (an empty cell?)"
    if not isinstance(value, str):
        return f"should be text, got {_short(value)}"
    return None if value.strip() else f"is empty ({_short(value)})"


def _messages_problem(value, last_role: Optional[str] = None) -> Optional[str]:
    if not isinstance(value, list) or not value:
        return f"should be a non-empty list of {{role, content}} messages, got {_short(value)}"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"message {i} should be a {{role, content}} object, got {_short(m)}"
        if m.get("role") not in ROLES:
            return f"message {i} has role {_short(m.get('role'))}; roles are {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({m['role']}) should have text content, got {_short(m.get('content'))}"
    if last_role and value[-1]["role"] != last_role:
        return f"should end with an {last_role} message to learn from, ends with {value[-1]['role']}"
    if not value[-1]["content"].strip():
        return f"ends with an empty {value[-1]['role']} message"
    return None


def _content_problem(value, last_role: Optional[str] = None) -> Optional[str]:
    """Text, or a conversation (ending with `last_role` when given)."""
    if isinstance(value, list):
        return _messages_problem(value, last_role)
    problem = _text_problem(value)
    if problem and problem.startswith("should be text"):
        return f"should be text or a list of {{role, content}} messages, got {_short(value)}"
    return problem


def _answer_problem(value) -> Optional[str]:
    return _content_problem(value, last_role="assistant")


def _label_problem(value) -> Optional[str]:
    return None if isinstance(value, bool) else f"should be true or false, got {_short(value)}"


# format -> column -> check (None = fine, else the problem)
ROW_CHECKS: dict[str, dict[str, Callable]] = {
    "messages": {"messages": lambda v: _messages_problem(v, last_role="assistant")},
    "preference": {"chosen": _answer_problem, "rejected": _answer_problem},
    "unpaired": {"prompt": _content_problem, "completion": _answer_problem, "label": _label_problem},
    "prompt_completion": {"prompt": _content_problem, "completion": _answer_problem},
    "text": {"text": _text_problem},
    "prompt": {"prompt": _content_problem},
}
# columns of a format that must all be text or all conversations (TRL tokenizes them together)
SAME_KIND = {"preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion"),
             "prompt_completion": ("prompt", "completion")}


def row_problem(fmt: str, row: dict) -> Optional[str]:
    """What is wrong with `row` as a `fmt` row ('column ...: ...'), or None."""
    for col, problem_of in ROW_CHECKS[fmt].items():
        if col not in row:
            return f"column '{col}' is missing (format {fmt})"
        problem = problem_of(row[col])
        if problem:
            return f"column '{col}' {problem}"
    if fmt == "preference" and row.get("prompt") is not None:
        problem = _content_problem(row["prompt"])
        if problem:
            return f"column 'prompt' {problem}"
    kinds = {c: isinstance(row[c], list) for c in SAME_KIND.get(fmt, ()) if row.get(c) is not None}
    if len(set(kinds.values())) > 1:
        return (f"columns {sorted(kinds)} mix text and conversations "
                f"({', '.join(c for c, conv in kinds.items() if conv)} conversational); use one kind for all")
    if fmt == "preference" and row["chosen"] == row["rejected"]:
        return "chosen and rejected are the same"
    return None


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


def read_text(path: Path) -> str:
    """A local data file's text: UTF-8, a leading byte-order mark dropped (as Windows editors write it).

    Raises:
        DataError: bytes that are not UTF-8, naming the file, the line and the column.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file "
                        f"as UTF-8") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            column = min(e.pos, len(line.rstrip("\r"))) + 1  # a row cut short fails past its end
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {column})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def load(name: str, cfg: DatasetConfig, *, on_bad_rows: Optional[str] = None,
         report: Optional[DataReport] = None) -> Loaded:
    """Read a dataset's rows (renamed, first `max_rows`; numbers in text columns become text,
    counted as `retyped` in `report`); errors name the file and line. `unpaired: true` checks
    the pairs (`check`, with `on_bad_rows`) and turns them into unpaired rows."""
    path = Path(cfg.path)
    if not is_hub(cfg) and not path.exists():
        raise DataError(f"dataset '{name}': file not found: {path}")
    if path.suffix in (".jsonl", ".json", ".csv") and not path.read_bytes().strip():
        raise DataError(f"dataset '{name}' ({path}) has no rows: the file is empty")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and _looks_like_jsonl(path)):
        rows, lines = _read_jsonl(path)
        where = lambda i: f"{path}:{lines[i]}"  # noqa: E731
    elif path.suffix == ".csv":
        rows, lines = _read_csv(path, text=[c for c in _csv_header(path) if cfg.columns.get(c, c) in TEXT_COLUMNS])
        where = lambda i: f"{path}:{lines[i]}"  # noqa: E731
    elif path.suffix in (".json", ".parquet"):
        rows = _read_table(path)
        where = lambda i: f"{path}: row {i + 1}"  # noqa: E731
    else:
        rows = _read_hub(cfg)
        where = lambda i: f"{cfg.path}[{cfg.split}]: row {i + 1}"  # noqa: E731
    if cfg.columns:
        rows = [{cfg.columns.get(k, k): v for k, v in r.items()} for r in rows]
    if path.suffix == ".csv":  # a CSV cell is text: `true` / `false` in a label column is the boolean
        for row in rows:
            if isinstance(row.get("label"), str) and row["label"].strip().lower() in ("true", "false"):
                row["label"] = row["label"].strip().lower() == "true"
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise DataError(f"dataset '{name}' ({cfg.path}) has no rows")
    report = DataReport() if report is None else report
    for i, row in enumerate(rows):
        for col in TEXT_COLUMNS:
            value = row.get(col)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[col] = str(value)
                report.add(name, "retyped", where(i), f"{col} {value!r} -> {row[col]!r}")
    loaded = Loaded(name, rows, str(cfg.path), where)
    if cfg.system_prompt is not None:
        _add_system_prompt(loaded, cfg.system_prompt, report)
    if cfg.unpaired:
        loaded = to_unpaired(loaded, on_bad_rows=on_bad_rows, report=report)
    return loaded


def _add_system_prompt(loaded: Loaded, text: str, report: DataReport) -> None:
    """Put `{"role": "system", "content": text}` first in each row's conversation -- `messages`, else `prompt`,
    else both `chosen` and `rejected` (an implicit prompt) -- unless it starts with a system message already;
    each row changed is counted (`system_prompt`). A malformed conversation is left to the format check.

    Raises:
        DataError: a row whose conversation is text (a system message needs a list of messages).
    """
    for i, row in enumerate(loaded.rows):
        columns = [c for c in ("messages", "prompt") if c in row][:1] or [c for c in ("chosen", "rejected") if c in row]
        plain = [c for c in columns if isinstance(row[c], str)] or (["text"] if not columns and "text" in row else [])
        if plain:
            column = plain[0]
            raise DataError(f"{loaded.where(i)}: dataset '{loaded.name}' has a system_prompt, but column '{column}' is "
                            f"text, not a conversation; give rows as lists of {{role, content}} messages, or drop "
                            f"system_prompt")
        changed = False
        for c in columns:
            conversation = row[c]
            if isinstance(conversation, list) and conversation and isinstance(conversation[0], dict) \
                    and conversation[0].get("role") != "system":
                row[c] = [{"role": "system", "content": text}, *conversation]
                changed = True
        if changed:
            report.add(loaded.name, "system_prompt", loaded.where(i))


def _looks_like_jsonl(path: Path) -> bool:
    if not path.exists():
        return False
    return read_text(path).lstrip()[:1] == "{"


def _csv_header(path: Path) -> list[str]:
    return next(csv.reader(io.StringIO(read_text(path), newline="")), [])


def _read_csv(path: Path, text: list[str]) -> tuple[list[dict], list[int]]:
    """Rows and the line each starts on (a quoted cell may span lines). The `text` columns are read
    as strings, an empty cell as "" (pandas would guess `7` is a number and `NA` is null); the
    other columns are typed by pandas (e.g. a KTO `label` of true/false)."""
    import pandas as pd

    content = read_text(path)
    try:
        df = pd.read_csv(io.StringIO(content, newline=""), dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: [""] for c in _csv_header(path) if c not in text})
    except Exception as e:  # pandas raises many types for malformed files
        raise DataError(f"{path}: cannot read as csv: {e}") from None
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    starts, end = [], 0
    reader = csv.reader(io.StringIO(content, newline=""))
    for record in reader:
        if record:  # pandas skips blank lines too
            starts.append(end + 1)
        end = reader.line_num
    return rows, starts[1:]  # line 1 is the header


def _read_table(path: Path) -> list[dict]:
    """A .parquet file, or a .json file holding one array of objects."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        rows = json.loads(read_text(path))
    except DataError:
        raise
    except Exception as e:  # pyarrow / json raise many types for malformed files
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a JSON array of objects (or one JSON object per line)")
    return rows


def is_hub(cfg: DatasetConfig) -> bool:
    """A dataset `load` reads through `datasets.load_dataset` (a hub id): its path is not a .jsonl/.json/.parquet/.csv file."""
    return Path(cfg.path).suffix not in (".jsonl", ".json", ".parquet", ".csv")


def _read_hub(cfg: DatasetConfig) -> list[dict]:
    """The rows of a hub dataset; where the hub does not answer one request (`hub.unreachable`), from the local
    hub cache only, instead of huggingface_hub's ~23 s of retries per file."""
    import datasets

    from alignment import hub

    why = hub.unreachable()
    try:
        with hub.cache_only() if why else contextlib.nullcontext():
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as e:
        raise DataError(f"dataset {cfg.path!r}: not a local file and could not be loaded from the hub: "
                        f"{hub.note(why) if why else e}") from None
    return ds.to_list()


def to_unpaired(loaded: Loaded, *, on_bad_rows: Optional[str] = None, report: Optional[DataReport] = None) -> Loaded:
    """chosen/rejected pairs -> (prompt, completion, label) rows, two per pair (for KTO)."""
    check(loaded, ("preference",), on_bad_rows=on_bad_rows, report=report)
    out, origin = [], []
    for i, row in enumerate(loaded.rows):
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({**extra, "prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({**extra, "prompt": row["prompt"], "completion": row["rejected"], "label": False})
        origin += [i, i]
    return Loaded(loaded.name, out, loaded.source, lambda j: loaded.where(origin[j]))


def split_prompt(row: dict):
    """(prompt, chosen, rejected) with an explicit prompt, or the shared start when implicit.

    Implicit text pairs split at a word boundary where they diverge (`"A: 12"` / `"A: 13"` ->
    `"A: "`, `"12"`, `"13"`), never inside a word or number, with both completions non-empty;
    conversations split after their shared turns.

    Raises:
        DataError: (no file:line; `check` adds it) the two are the same, or share no prompt.
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        return row["prompt"], chosen, rejected
    if chosen == rejected:
        raise DataError("chosen and rejected are the same")
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
    else:
        n = len(os.path.commonprefix([chosen, rejected]))
        while n > 0 and (n in (len(chosen), len(rejected)) or _inside_word(chosen, n) or _inside_word(rejected, n)):
            n -= 1
    if n == 0:
        raise DataError("chosen and rejected share no prompt (no common start up to a word or turn boundary); "
                        "add an explicit `prompt` column")
    return chosen[:n], chosen[n:], rejected[n:]


def _inside_word(text: str, i: int) -> bool:
    """Position i falls between two letters/digits of one word or number."""
    return 0 < i < len(text) and text[i - 1].isalnum() and text[i].isalnum()


# ---------------------------------------------------------------- checks and mixtures


def check(loaded: Loaded, accept: tuple[str, ...], *, on_bad_rows: Optional[str] = None,
          report: Optional[DataReport] = None) -> str:
    """The dataset's format (one of `accept`), every row checked (`row_problem`); implicit-prompt
    pairs get their prompt (`split_prompt`, counted as `split`). Malformed rows raise one DataError
    listing them (the first few with file:line), or, under `on_bad_rows: drop | warn`, are left out
    of `loaded` and counted as `dropped` in `report`.

    Raises:
        DataError: wrong columns; malformed rows (on_bad_rows error); no row left.
    """
    fmt = detect_format(loaded.rows[0].keys())
    if fmt not in accept:
        wanted = " or ".join("/".join(FORMATS[f]) for f in accept)
        raise DataError(
            f"{loaded.where(0)}: dataset '{loaded.name}' has columns {sorted(loaded.rows[0])}; expected {wanted} "
            f"(rename columns with `columns: {{old: new}}` under data.{loaded.name})"
        )
    report = DataReport() if report is None else report
    kept, bad = [], []
    for i, row in enumerate(loaded.rows):
        problem = row_problem(fmt, row)
        if problem is None and fmt == "preference" and row.get("prompt") is None:
            try:
                loaded.rows[i] = {**row, **dict(zip(("prompt", "chosen", "rejected"), split_prompt(row)))}
                report.add(loaded.name, "split", loaded.where(i), f"prompt ends {_short(loaded.rows[i]['prompt'][-20:])}")
            except DataError as e:
                problem = f"implicit prompt: {e}"
        if problem is None:
            kept.append(i)
        else:
            bad.append((loaded.where(i), problem))
    if bad and bad_row_policy(on_bad_rows, "malformed") == "error":
        more = f"\n  ... {len(bad) - EXAMPLES} more" if len(bad) > EXAMPLES else ""
        raise DataError("\n  ".join(f"{where}: {why}" for where, why in bad[:EXAMPLES]) + more +
                        f"\n  {len(bad)} malformed row(s) of {len(loaded.rows)} in dataset '{loaded.name}' "
                        f"(format {fmt}); fix them, or set `on_bad_rows: drop` to leave them out")
    for where, why in bad:
        report.add(loaded.name, "dropped", where, why)
    if not kept:
        raise DataError(f"dataset '{loaded.name}': no usable rows ({len(bad)} malformed); first: {': '.join(bad[0])}")
    if bad:
        where = loaded.where
        loaded.rows = [loaded.rows[i] for i in kept]
        loaded.where = lambda j: where(kept[j])
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


def build(datasets_cfg: dict[str, DatasetConfig], refs: list[DataRef], accept: tuple[str, ...], *, seed: int = 0,
          on_bad_rows: Optional[str] = None, report: Optional[DataReport] = None,
          contaminated: Optional[Callable[[dict], Optional[str]]] = None, decontaminate: Optional[str] = None):
    """A `datasets.Dataset` for a stage: load, check and mix its data refs; prints what changed
    (the `report`'s lines) on the stage's console. `contaminated` (`alignment.decontam.row_filter`) says why a row
    overlaps an eval set: under `decontaminate` "drop" such rows are left out, under "warn" kept; both counted.

    Columns beyond the format's are kept (rewards read them, e.g. `answer`); only columns present
    in every part of a mixture survive it.

    Raises:
        DataError: see `load` and `check`; a mixture of formats.
    """
    import datasets

    if not refs:
        raise DataError("this stage has no data: add `data: [NAME]` naming a dataset under data:")
    report = DataReport() if report is None else report
    parts, formats = [], set()
    for ref in refs:
        loaded = load(ref.name, datasets_cfg[ref.name], on_bad_rows=on_bad_rows, report=report)
        formats.add(check(loaded, accept, on_bad_rows=on_bad_rows, report=report))
        rows = loaded.rows
        if contaminated is not None:
            rows = []
            for i, row in enumerate(loaded.rows):
                why = contaminated(row)
                if why is not None:
                    report.add(ref.name, "contaminated" if decontaminate == "drop" else "overlapping", loaded.where(i), why)
                if why is None or decontaminate != "drop":
                    rows.append(row)
            if not rows:
                raise DataError(f"dataset '{ref.name}': every row shares an n-gram with an eval set (decontaminate: drop)")
        parts.append((rows, ref.weight))
    if len(formats) > 1:
        raise DataError(f"a mixture must share one format; got {sorted(formats)} from {[r.name for r in refs]}")
    for line in report.lines():
        print(f"alignkit: {line}", flush=True)
    common = set.intersection(*(set(rows[0]) for rows, _ in parts))
    return datasets.Dataset.from_list([{k: r.get(k) for k in common} for r in mixture(parts, seed)])


# ---------------------------------------------------------------- truncation by max_length


SPAN_BATCH = 512  # rows tokenized per tokenizer call by `completion_spans`


def _token_ids(tokenizer, contents: list, **chat) -> list[list[int]]:
    """Token ids of each of `contents` -- all texts (tokenizer call) or all conversations (their chat template), as
    TRL's SFT does -- in one batched tokenizer call: a call per row costs ~10x more than its tokens."""
    if isinstance(contents[0], list):
        return tokenizer.apply_chat_template(contents, tokenize=True, return_dict=True, **chat)["input_ids"]
    return tokenizer(text=contents)["input_ids"]


def _span_parts(row: dict) -> tuple:
    """(the prompt or None, the full sequences) of a row, as `completion_span` measures it: no prompt (the
    completion starts at 0) for a `text` row or a conversation of one turn."""
    if "messages" in row:
        prompt, answers = row["messages"][:-1], [row["messages"]]
    elif "text" in row and "prompt" not in row:
        prompt, answers = None, [row["text"]]
    else:
        prompt = row["prompt"]
        answers = [prompt + row[c] for c in ("completion", "chosen", "rejected") if c in row]
    return (None if prompt == [] else prompt), answers


def completion_spans(rows: list[dict], tokenizer) -> list[tuple[int, int]]:
    """`completion_span` of each row, tokenized `SPAN_BATCH` rows per tokenizer call."""
    out = []
    for first in range(0, len(rows), SPAN_BATCH):
        parts = [_span_parts(row) for row in rows[first:first + SPAN_BATCH]]
        batches: dict[tuple[bool, bool], list] = {}  # (a conversation?, a prompt?) -> what to tokenize alike
        for prompt, answers in parts:
            for content, is_prompt in ([(prompt, True)] if prompt is not None else []) + [(a, False) for a in answers]:
                batches.setdefault((isinstance(content, list), is_prompt), []).append(content)
        ids = {key: iter(_token_ids(tokenizer, contents, **({"add_generation_prompt": True} if all(key) else {})))
               for key, contents in batches.items()}
        for prompt, answers in parts:
            prompt_ids = list(next(ids[isinstance(prompt, list), True])) if prompt is not None else []
            spans = []
            for full in answers:
                full_ids = list(next(ids[isinstance(full, list), False]))
                start = len(os.path.commonprefix([prompt_ids, full_ids]))  # TRL's common_prefix_length
                spans.append((start, len(full_ids) + (not isinstance(full, list))))  # + the EOS TRL appends to text
            out.append((min(s for s, _ in spans), max(n for _, n in spans)))
    return out


def completion_span(row: dict, tokenizer) -> tuple[int, int]:
    """(where the completion starts, total length) in tokens of a row as a trainer sees it:
    prompt + completion (the longer of chosen / rejected for pairs), a conversation's last turn,
    or a `text` row (start 0)."""
    return completion_spans([row], tokenizer)[0]


_counted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {rows' digest: their spans}


def _dataset_spans(tokenizer, rows: list[dict]) -> list[tuple[int, int]]:
    """`completion_spans` of a dataset's rows, remembered for this tokenizer object (and its chat template) until
    `check_truncation` is done with it: `alignkit run` counts while it checks the recipe (`validate`), then the
    stage it starts in the same process counts with the same tokenizer (`models.keep_tokenizer`)."""
    key = hashlib.sha256(json.dumps([tokenizer.chat_template, rows], sort_keys=True, default=str).encode()).hexdigest()
    memo = _counted.setdefault(tokenizer, {})
    if key not in memo:
        memo[key] = completion_spans(rows, tokenizer)
    return memo[key]


# How a trainer treats a row longer than its `max_length` (a stage's `long_rows`): TRL's SFT, DPO and KTO keep its
# first tokens (dropping a row left without a completion token), its RewardTrainer leaves the row out.
LONG_ROWS = ("truncates", "drops")


def _long_row_kind(start: int, length: int, max_length: int, long_rows: str) -> Optional[tuple[str, str]]:
    """(kind, why) of a row of `length` tokens whose completion starts at `start`, or None when it fits."""
    if length <= max_length:
        return None
    if long_rows == "drops":
        return "too_long", f"{length} tokens > max_length {max_length}"
    if start >= max_length and length > start:
        return "truncated", f"prompt of {start} tokens >= max_length {max_length}"
    return "truncated_partly", f"{length} tokens > max_length {max_length}"


def count_truncated(tokenizer, max_length: int, datasets_cfg: dict[str, DatasetConfig], refs: list[DataRef],
                    accept: tuple[str, ...], *, on_bad_rows: Optional[str] = None, report: Optional[DataReport] = None,
                    long_rows: str = "truncates") -> None:
    """Count, per dataset, the rows `max_length` affects into `report`, with file:line: under `long_rows`
    "truncates" (keep the first tokens, TRL's default) those whose completion it cuts away completely
    (`truncated`) or partly (`truncated_partly`); under "drops" those the trainer leaves out (`too_long`).
    Needs only the tokenizer: `validate` runs it before any model loads, the stage again (`check_truncation`).

    Raises:
        DataError: no row keeps a token of its completion (whatever the policy: nothing would train),
            or any row is affected under `on_bad_rows: error`.
    """
    report = DataReport() if report is None else report
    before, total = {k: report.rows(k) for k in TRUNCATION}, 0
    for ref in refs:
        loaded = load(ref.name, datasets_cfg[ref.name], on_bad_rows=on_bad_rows)
        check(loaded, accept, on_bad_rows=on_bad_rows)
        total += len(loaded.rows)
        for i, (start, length) in enumerate(_dataset_spans(tokenizer, loaded.rows)):
            found = _long_row_kind(start, length, max_length, long_rows)
            if found:
                report.add(ref.name, found[0], loaded.where(i), found[1])
    new = {k: report.rows(k) - before[k] for k in TRUNCATION}
    lost = new["truncated"] + new["too_long"]
    if (total and lost == total) or (bad_row_policy(on_bad_rows, "truncated") == "error" and sum(new.values())):
        lines = "\n  ".join(report.lines(TRUNCATION))
        why = "every row loses its whole completion" if lost == total else "on_bad_rows: error"
        raise DataError(f"max_length {max_length}: {why}:\n  {lines}\n  raise `max_length` under the stage's args, "
                        f"or shorten the rows")


def check_truncation(dataset, tokenizer, max_length: Optional[int], datasets_cfg: dict[str, DatasetConfig],
                     refs: list[DataRef], accept: tuple[str, ...], *, on_bad_rows: Optional[str] = None,
                     report: Optional[DataReport] = None, long_rows: str = "truncates"):
    """`count_truncated`, then print the counts with file:line and apply `on_bad_rows` (default warn): drop
    leaves out of `dataset` (rows of `build(datasets_cfg, refs, accept)`) the rows that keep no completion token.

    Returns:
        `dataset`, without those rows under `on_bad_rows: drop`.

    Raises:
        DataError: see `count_truncated`.
    """
    if max_length is None:
        return dataset
    report = DataReport() if report is None else report
    try:
        count_truncated(tokenizer, max_length, datasets_cfg, refs, accept, on_bad_rows=on_bad_rows, report=report,
                        long_rows=long_rows)
    finally:
        _counted.pop(tokenizer, None)  # the stage's last count: not held while it trains
    for line in report.lines(TRUNCATION):
        print(f"alignkit: max_length {max_length}: {line}", flush=True)
    if bad_row_policy(on_bad_rows, "truncated") == "drop" and report.rows("truncated") + report.rows("too_long"):
        def keeps(row) -> bool:
            found = _long_row_kind(*completion_span(row, tokenizer), max_length, long_rows)
            return found is None or found[0] == "truncated_partly"

        dataset = dataset.filter(keeps)
    return dataset
