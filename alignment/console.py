"""The console every `alignkit` command prints with: rich's, except that output which does not go to a terminal
(`alignkit plan R | cat`, a CI log, a file) keeps its tables and lines whole.

rich sizes a console that writes to no terminal at 80 columns (or at whatever terminal stdin or stderr is
attached to), so a wide table came out cut ("memory…", "/tmp/run/s…") in exactly the logs people keep. A
terminal still sets the width, and so does an explicit `COLUMNS` (or `width=`), as in rich.
"""
from __future__ import annotations

from rich.console import Console as RichConsole
from rich.console import ConsoleDimensions

UNCUT_WIDTH = 10_000  # columns when the output is not a terminal: wider than any table or line alignkit prints


class Console(RichConsole):
    """`rich.console.Console` whose width, when its file is not a terminal and neither `COLUMNS` nor `width=` says
    otherwise, is `UNCUT_WIDTH` instead of rich's 80-column fallback (tables then take their natural width)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = RichConsole.size.fget(self)
        if self._width is None and not self._environ.get("COLUMNS", "").isdigit() and not self.file.isatty():
            return ConsoleDimensions(UNCUT_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        RichConsole.size.fset(self, new_size)
