"""``mltasks dev``'s screen: the status table refreshed every second on a terminal (a load
summary line every 5 s otherwise), until a child exits or Ctrl-C."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from mltasks.config import Config
from mltasks.ops.devload import LoadRunner

REFRESH_S: Final = 1.0


def screen(cfg: Config, load: LoadRunner | None) -> Any:
    """The status table, the load's summary line, and how to stop."""
    from rich.console import Group
    from rich.text import Text

    from mltasks.ops.status import collect, render

    parts: list[Any] = [render(collect(cfg, window_s=60, timeout_s=1.0))]
    if load is not None:
        parts.append(Text(load.summary()))
    parts.append(Text("Ctrl-C stops everything.", style="dim"))
    return Group(*parts)


def watch(
    cfg: Config,
    check: Callable[[], None],
    load: LoadRunner | None,
    live: bool,
) -> None:
    """Until ``check`` raises (a child exited: MLTasksError) or Ctrl-C; the screen
    refreshes every second."""
    if live:
        from rich.live import Live

        with Live(screen(cfg, load), auto_refresh=False, transient=False) as shown:
            while True:
                check()
                time.sleep(REFRESH_S)
                shown.update(screen(cfg, load), refresh=True)
    next_line = time.monotonic() + 5.0
    while True:
        check()
        time.sleep(0.5)
        if load is not None and time.monotonic() >= next_line:
            next_line += 5.0
            print(load.summary(), flush=True)
