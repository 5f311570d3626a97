"""Progress output: a bar on a terminal, one line per stage start and end anywhere else."""

from __future__ import annotations

import io

from sparkee.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_when_a_stage_starts_and_one_when_it_ends():
    log = io.StringIO()
    items = list(Progress(range(50), desc="calibrating", file=log))
    assert items == list(range(50))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2 and lines[0] == "calibrating: started (50 to do)"
    assert lines[1].startswith("calibrating: done in ")


def test_manual_updates_in_a_with_block_end_once():
    log = io.StringIO()
    with Progress(total=4, desc="eval", file=log, unit="run") as bar:
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.1")
    assert log.getvalue().count("\n") == 2 and "eval: done in" in log.getvalue()


def test_disabled_progress_prints_nothing_and_a_terminal_gets_the_bar():
    quiet = io.StringIO()
    assert list(Progress(range(3), desc="x", enabled=False, file=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    tty = Terminal()
    list(Progress(range(3), desc="bar", file=tty, mininterval=0))
    assert "\r" in tty.getvalue() and "started" not in tty.getvalue()
