"""Reads a run directory incrementally: new events, config and plan, trainer liveness.

`RunReader.poll()` does file I/O only and returns plain data, so the dashboard
calls it from a worker thread and `lowmem monitor --no-tui` from a loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowmem.errors import CheckpointError
from lowmem.events import (EVENTS_FILE, READ_CHUNK, lock_words, read_jsonl_tail, run_dir_hint, this_host,
                           trainer_alive, trainer_may_hold)

CONFIG_FILE = "config.yaml"
PLAN_FILE = "plan.yaml"

# How long a reader waits for a run without a `start` event to be taken by a trainer before
# it concludes none will come (a trainer launched with the dashboard imports torch first).
START_GRACE_S = 30.0

# A trainer on another host cannot be checked from here: after this long without an event
# (not paused) the reader says it may be gone, and goes on reading.
QUIET_S = 600.0


def check_run_dir(run_dir: str | Path, *, require_run_files: bool = False) -> Path:
    """The run directory as a Path, or a CheckpointError that says what is wrong with it."""
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"run directory {path} does not exist{run_dir_hint(path)}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a run directory such as runs/NAME)")
    if path.resolve().parent.name == "checkpoints" and (path / "manifest.json").is_file():
        raise CheckpointError(f"{path} is a checkpoint, not a run: open its run directory "
                          f"{path.resolve().parent.parent}")
    if require_run_files and not any((path / f).exists() for f in (EVENTS_FILE, CONFIG_FILE, PLAN_FILE)):
        raise CheckpointError(f"{path} is not a run directory: it has no {EVENTS_FILE}, "
                          f"{CONFIG_FILE} or {PLAN_FILE}")
    return path


@dataclass
class Update:
    """What changed in the run directory since the last poll."""

    events: list[dict] = field(default_factory=list)
    config: dict | None = None        # set when config.yaml was (re)read
    plan: dict | None = None          # set when plan.yaml was (re)read
    trainer_gone: bool = False        # the trainer exited without `done` or `error`
    problems: list[str] = field(default_factory=list)
    restarted: bool = False           # events.jsonl was replaced (a run started over): `events` are all of it
    behind: bool = False              # events.jsonl has more: a long log comes a chunk at a time
    quiet: str | None = None          # a trainer on another host silent for QUIET_S ("" once it speaks again)

    def __bool__(self) -> bool:
        return bool(self.events or self.config is not None or self.plan is not None
                    or self.trainer_gone or self.problems or self.restarted or self.quiet is not None)


def is_history(event: dict, since: float | None) -> bool:
    """Whether an event was written before `since`: by an earlier session of the run, which says
    nothing about the trainer that `lowmem train --resume` has just launched."""
    t = event.get("t")
    return since is not None and isinstance(t, (int, float)) and t < since - 0.001


class RunReader:
    """Follows one run directory. Not thread-safe: one reader per thread.

    With `since` (when `lowmem train` launched the trainer), a `start`, `done` or `error`
    written before it is an earlier session's: the run is live from the next `start`.
    """

    def __init__(self, run_dir: str | Path, *, check_trainer: bool = True, since: float | None = None):
        self.run_dir = Path(run_dir)
        self.check_trainer = check_trainer
        self.since = since
        self.offset = 0
        self._inode: int | None = None
        self._first = b""                 # the first line of the events file being followed
        self._mtimes: dict[str, float] = {}
        self._pid: int | None = None      # the trainer's pid, when it runs on this host
        self._start_t: float | None = None
        self._done = False            # `done` seen after the last `start`
        self._error = False           # `error` seen after the last `start`
        self._gone = False            # the trainer's pid is gone without `done`
        self._opened = time.monotonic()
        self._started_elsewhere = False   # a `start` from another host: no pid to watch
        self.behind = False               # events.jsonl has more than the last poll read
        self._host: str | None = None     # where that trainer runs
        self._paused = False
        self._heard = time.monotonic()    # when the last event was read
        self._quiet = False               # said that the trainer elsewhere has gone quiet

    def poll(self) -> Update:
        update = Update()
        update.config = self._read_yaml(CONFIG_FILE, update)
        update.plan = self._read_yaml(PLAN_FILE, update)
        self._read_events(update)
        if self.behind:
            pass   # what the trainer's end means waits until the file is read to its end
        elif self.check_trainer and self._pid is not None and not self._done and not self._gone:
            if not trainer_alive(self._pid, self._start_t):
                # The trainer may have written its last events just before exiting.
                self._read_events(update)
                while self.behind:
                    self._read_events(update)
                if not self._done:
                    update.trainer_gone = self._gone = True
                    self._why_silent(update)
        elif (self.check_trainer and self._pid is None and not (self._done or self._error or self._gone)
              and time.monotonic() - self._opened > START_GRACE_S and not self._started_elsewhere):
            if not trainer_may_hold(self.run_dir):
                # No `start` yet, and no trainer holds the run: it died loading (or was never
                # started), and nothing will come. The grace lets a trainer just launched get there.
                update.trainer_gone = self._gone = True
                self._why_silent(update)
            elif not self._quiet:
                # A trainer holds the run but has not started: loading a large model, or on a
                # host this one cannot check. Said once; its `start` ends the wait.
                self._quiet = True
                holder = " ".join(lock_words(self.run_dir)) or "a trainer"
                update.quiet = (f"no `start` event after {START_GRACE_S:.0f} s: waiting for the trainer that holds "
                                f"the run ({holder}) to load and begin")
        elif self._started_elsewhere and not (self._done or self._error or self._paused):
            quiet = time.monotonic() - self._heard
            if quiet > QUIET_S and not self._quiet:
                self._quiet = True
                update.quiet = (f"no event for over {QUIET_S / 60:.0f} min from the trainer on {self._host}, "
                                "which this host cannot check: it may have stopped")
        return update

    @property
    def over(self) -> bool:
        """Nothing more will be written: `done`, the trainer gone, or an `error` with no pid to watch."""
        watching = self.check_trainer and self._pid is not None
        return self._done or self._gone or (self._error and not watching)

    def _read_events(self, update: Update) -> None:
        path = self.run_dir / EVENTS_FILE
        try:
            info = path.stat()
        except FileNotFoundError:
            info = None
        if info is not None and self.offset and (info.st_ino != self._inode or info.st_size < self.offset
                                                 or self._head(path) != self._first):
            # Replaced: a run resumed before its first checkpoint starts over in a new file (which
            # may get the old one's inode back: its first line, a `start` with its time, differs).
            self.offset, self._first = 0, b""
            update.restarted = True
            update.events.clear()
            self._pid, self._start_t = None, None
            self._done = self._error = self._gone = self._started_elsewhere = False
        if info is not None:
            self._inode = info.st_ino
        before = self.offset
        skipped: list[int] = []
        events, self.offset = read_jsonl_tail(path, self.offset, READ_CHUNK, skipped)
        if skipped:
            update.problems.append(f"{EVENTS_FILE}: {len(skipped)} line{'s' if len(skipped) > 1 else ''} that "
                                   f"{'are' if len(skipped) > 1 else 'is'} not an event skipped (from byte "
                                   f"{skipped[0]}): the file is damaged")
        self.behind = update.behind = info is not None and before < self.offset < info.st_size
        if self.offset and not self._first:
            self._first = self._head(path)
        for event in events:
            if is_history(event, self.since):
                continue
            kind = event.get("kind")
            if kind == "start":
                # A trainer on another host (a run directory on shared storage) has a pid that
                # means nothing here: it cannot be watched, only read. Runs from before `host`
                # was recorded count as local.
                local = event.get("host") in (None, this_host())
                self._pid = event.get("pid") if local else None
                self._started_elsewhere = not local
                self._host = event.get("host")
                self._paused = False
                self._start_t = event.get("t")
                self._done = self._error = self._gone = False
            elif kind == "done":
                self._done = True
                self._resume_from_here(event)
            elif kind == "error":
                self._error = True
            elif kind in ("paused", "resumed"):
                self._paused = kind == "paused"
        if events:
            self._heard = time.monotonic()
            if self._quiet:
                self._quiet, update.quiet = False, ""
        update.events.extend(events)

    def _resume_from_here(self, event: dict) -> None:
        """The `done` event's resume command names the run as its trainer was given it, maybe
        relative to another folder: from here it names the run as this reader was given it."""
        command = event.get("resume")
        if not isinstance(command, str) or " --resume " not in command:
            return
        head, _, rest = command.partition(" --resume ")
        named, space, tail = rest.partition(" ")
        try:
            same = Path(named).resolve() == self.run_dir.resolve()
        except OSError:
            same = False
        if not same:
            event["resume"] = f"{head} --resume {self.run_dir}{space}{tail}"

    def _why_silent(self, update: Update) -> None:
        """What the events file itself says about a trainer that ended without `done`: that
        there is none, or that it ends in a line cut short (a `done` may have been in it)."""
        path = self.run_dir / EVENTS_FILE
        try:
            size = path.stat().st_size
        except OSError:
            update.problems.append(f"there is no {EVENTS_FILE} in {self.run_dir}: the run wrote none, "
                                   f"or it was removed")
            return
        if size > self.offset:
            update.problems.append(f"{EVENTS_FILE} ends in an incomplete line ({size - self.offset} bytes "
                                   f"with no newline): it was cut short")

    @staticmethod
    def _head(path: Path) -> bytes:
        """The file's first line (its `start` event): which file this is."""
        try:
            with open(path, "rb") as f:
                return f.readline(4096)
        except OSError:
            return b""

    def _read_yaml(self, name: str, update: Update) -> dict | None:
        path = self.run_dir / name
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if self._mtimes.get(name) == mtime:
            return None
        self._mtimes[name] = mtime
        try:
            data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            update.problems.append(f"{name} could not be read: {str(e).splitlines()[0]}")
            return None
        if not isinstance(data, dict):
            update.problems.append(f"{name} is not a mapping of key: value")
            return None
        return data


def follow(run_dir: str | Path, poll_s: float = 0.5, *, check_trainer: bool = True, since: float | None = None):
    """Yields Updates until the run is over (done, error, or the trainer gone)."""
    reader = RunReader(run_dir, check_trainer=check_trainer, since=since)
    while True:
        update = reader.poll()
        if update:
            yield update
        if reader.over:
            return
        if not reader.behind:
            time.sleep(poll_s)
