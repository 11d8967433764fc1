"""Decontamination: word n-gram overlap between a recipe's training sets and its eval sets.

A row's text is each of its text fields apart -- `prompt`, `completion`, `chosen`, `rejected`, `text`, and every
message's content but system and developer messages' (an instruction shared by every row is not contamination) --
lower-cased and split into words (`\\w+`); its grams are the fields' word n-grams (13 by default, as in GPT-3's
contamination study, Brown et al. 2020, appendix C), and a field shorter than n words is one gram of its own, so a
short question repeated word for word is caught too. A training row overlaps an eval
set when one of its grams is one of the eval set's. The eval sets are indexed (they are the small side); the
training sets are streamed past the index.

`alignkit validate` and `plan` report the overlap of every (training set, eval set) pair, by row; the recipe's
`decontaminate: {ngram: 13, action: drop | warn}` makes every stage drop the overlapping training rows or keep
them with a warning, counted in the stage's `DataReport` (kinds `contaminated` / `overlapping`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from alignment.data import EXAMPLES  # examples kept per (training set, eval set) pair, as per data report kind
from alignment.recipe import DecontaminateConfig, Recipe

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "text", "messages")
_WORD = re.compile(r"\w+")


def _texts(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):  # a conversation
        for message in value:
            if isinstance(message, dict) and isinstance(message.get("content"), str) \
                    and message.get("role") not in ("system", "developer"):
                yield message["content"]


def row_grams(row: dict, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of a row's text fields (a field shorter than `n` words: the field itself).

    >>> sorted(row_grams({"prompt": "What is 2+2?", "answer": "4"}, 3))
    [('2', '2'), ('is', '2', '2'), ('what', 'is', '2')]
    """
    grams: set[tuple[str, ...]] = set()
    for key in TEXT_FIELDS:
        for text in _texts(row.get(key)):
            words = _WORD.findall(text.lower())
            if 0 < len(words) < n:
                grams.add(tuple(words))
            grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


@dataclass
class EvalIndex:
    """Every n-gram of the recipe's eval sets -> (eval set, where: file:line) of its first row."""

    n: int
    grams: dict[tuple[str, ...], tuple[str, str]] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)  # eval set names, in recipe order

    @classmethod
    def build(cls, recipe: Recipe, n: int) -> "EvalIndex":
        """Index the data sets the recipe's `evals:` name.

        Raises:
            alignment.data.DataError: an eval set cannot be read.
        """
        from alignment.data import load

        index = cls(n)
        for name in dict.fromkeys(ev.data for ev in recipe.evals if ev.data):
            index.sets.append(name)
            loaded = load(name, recipe.data[name])
            for i, row in enumerate(loaded.rows):
                for gram in row_grams(row, n):
                    index.grams.setdefault(gram, (name, loaded.where(i)))
        return index

    def match(self, row: dict) -> Optional[tuple[str, str, str]]:
        """(eval set, its file:line, the shared gram as text) of the first gram of `row` found, or None."""
        for gram in sorted(row_grams(row, self.n)):  # sorted: the same example on every run
            if gram in self.grams:
                name, where = self.grams[gram]
                return name, where, " ".join(gram)
        return None


def training_sets(recipe: Recipe) -> list[str]:
    """The data sets some stage trains on, in stage order."""
    return list(dict.fromkeys(ref.name for s in recipe.order() for ref in recipe.stages[s].data))


@dataclass
class PairOverlap:
    train: str
    eval: str
    rows: int = 0  # training rows sharing a gram with the eval set
    total: int = 0  # rows of the training set
    examples: list[str] = field(default_factory=list)


def overlap_report(recipe: Recipe) -> tuple[int, list[PairOverlap]]:
    """(n, one `PairOverlap` per training set x eval set) for the recipe (`decontaminate.ngram`, else the default).

    Raises:
        alignment.data.DataError: a data set cannot be read.
    """
    from alignment.data import load

    n = (recipe.decontaminate or DecontaminateConfig()).ngram
    index = EvalIndex.build(recipe, n)
    pairs = []
    for train in training_sets(recipe) if index.sets else []:  # no eval set: no training set to read
        loaded = load(train, recipe.data[train], on_bad_rows="warn")
        found = {name: PairOverlap(train, name, total=len(loaded.rows)) for name in index.sets}
        for i, row in enumerate(loaded.rows):
            hit = index.match(row)
            if hit is not None:
                pair = found[hit[0]]
                pair.rows += 1
                if len(pair.examples) < EXAMPLES:
                    pair.examples.append(f"{loaded.where(i)} ~ {hit[1]}: '{_cut(hit[2])}'")
        pairs += found.values()
    return n, pairs


def report_lines(n: int, pairs: list[PairOverlap], action: Optional[str]) -> list[str]:
    """What validate and plan print: one line per pair, examples where rows overlap, and what the run will do."""
    if not pairs:
        return []
    then = {"drop": "the stages leave these rows out (decontaminate: drop)",
            "warn": "the stages keep them, warning (decontaminate: warn)",
            None: "set `decontaminate: {action: drop}` to leave them out"}[action]
    lines = []
    for p in pairs:
        line = f"{n}-gram overlap: training set '{p.train}' x eval set '{p.eval}': {p.rows} of {p.total} row(s)"
        lines.append(line + (f"; e.g. {'; '.join(p.examples)}" if p.rows else ""))
    if any(p.rows for p in pairs):
        lines.append(then)
    return lines


def row_filter(recipe: Recipe) -> Optional[Callable[[dict], Optional[str]]]:
    """For `alignment.data.build` under `decontaminate:`: row -> why it overlaps an eval set (None: it does not)."""
    if recipe.decontaminate is None:
        return None
    index = EvalIndex.build(recipe, recipe.decontaminate.ngram)

    def why(row: dict) -> Optional[str]:
        hit = index.match(row)
        return None if hit is None else f"{index.n}-gram '{_cut(hit[2])}' also in eval set '{hit[0]}' ({hit[1]})"

    return why


def _cut(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."
