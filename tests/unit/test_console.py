"""alignment/console.py: output that does not go to a terminal (a pipe, a CI log) keeps its tables whole."""
from __future__ import annotations

import io
import os

from rich.console import Console as RichConsole
from rich.table import Table
from typer.testing import CliRunner

from alignment.cli import _summary, app
from alignment.console import Console
from tests.helpers import write_recipe

LONG = "/runs/" + "a-rather-long-run-directory-name/" * 4 + "sft/model"


def _wide_table() -> Table:
    table = Table()
    for col in ("stage", "method", "memory/device", "artifact"):
        table.add_column(col)
    table.add_row("sft", "sft", "0.1 GiB", LONG)
    return table


def test_a_pipe_gets_the_whole_table_and_unwrapped_lines(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    console = Console(file=out)
    console.print(_wide_table())
    console.print("x " * 100)
    lines = out.getvalue().splitlines()
    assert any(LONG in line for line in lines) and "…" not in out.getvalue()
    assert lines[-1] == "x " * 100  # one line, not wrapped at 80
    assert max(map(len, lines)) <= 200  # nothing padded out to the (unbounded) width


def test_columns_or_a_terminal_still_set_the_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert Console(file=io.StringIO()).width == 60
    monkeypatch.delenv("COLUMNS")
    primary, secondary = os.openpty()
    with open(secondary, "w") as tty:
        assert Console(file=tty).width == RichConsole(file=tty).width < 1000
    os.close(primary)


def test_plan_and_the_run_summary_print_whole_tables_into_a_pipe(tiny_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)  # pytest-xdist's workers set COLUMNS=80 before the cli's console is made:
    monkeypatch.setattr("alignment.cli.console", Console(highlight=False))  # as `alignkit` starts without it
    runs = tmp_path / ("a-rather-long-run-directory-name-" * 3)
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": {"method": "sft", "data": ["sft"]}})
    res = CliRunner().invoke(app, ["plan", str(recipe), "--run-dir", str(runs)])
    assert res.exit_code == 0, res.output
    assert "memory/device" in res.output and "fingerprint" in res.output and "…" not in res.output
    assert str(runs / "t") in res.output  # the title, on one line
    _summary([{"stage": "sft", "method": "sft", "status": "ran", "seconds": 3.0, "metrics": {"train_loss": 1.5}}],
             runs / "t")
    printed = capsys.readouterr().out
    assert str(runs / "t" / "sft" / "model") in printed and "…" not in printed
