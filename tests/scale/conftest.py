"""The scale suite's notes (emulated latency missing, recovery times) in the terminal
summary, so that a plain `pytest` run, and CI's log, show them without `-s`."""

from __future__ import annotations

import pytest

from tests.scale.netns import NOTES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if NOTES:
        terminalreporter.section("scale")
        for note in NOTES:
            terminalreporter.write_line(note)
