"""The Textual dashboard: a reader of the run directory that sends control requests.

`run_dashboard(run_dir)` is the entry point for `lowmem train` and
`lowmem monitor`. Textual is imported only when the dashboard opens, so the
plain-text parts (`lowmem.tui.reader`, `lowmem.tui.describe`) stay cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .reader import check_run_dir

if TYPE_CHECKING:
    from .app import DashboardApp

__all__ = ["DashboardApp", "run_dashboard", "check_run_dir"]


def run_dashboard(run_dir: str | Path, *, poll_s: float = 0.5, since: float | None = None) -> str:
    """Open the dashboard on a run directory; returns what the user chose on exit.

    "detach"    the dashboard closed and the trainer goes on (reattach: `lowmem monitor RUN_DIR`)
    "stop"      a stop request was written: the trainer checkpoints and stops
    "finished"  the run had ended (a `done` event) when the dashboard closed
    "closed"    the run was over without `done` (crashed, or its trainer is gone)

    `poll_s` is the time between reads of the run directory. `since` is when `lowmem train`
    launched the trainer: events written before it are an earlier session's (a resume).
    Raises CheckpointError if the run directory does not exist.
    """
    from .app import DashboardApp

    app = DashboardApp(check_run_dir(run_dir), poll_s=poll_s, since=since)
    result = app.run()
    return result if result in ("detach", "stop") else app.closing_result()


def __getattr__(name: str):
    if name == "DashboardApp":
        from .app import DashboardApp

        return DashboardApp
    raise AttributeError(name)
