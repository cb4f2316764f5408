"""RunState: what the dashboard knows about a run, folded from the run directory's updates.

Plain data with no Textual in it: the app applies each `Update` on the UI
thread and its panels read from here. Every figure derives from the events
(not the wall clock), so a finished run replays identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowmem.events import is_number

from .reader import Update, is_history



@dataclass
class RunState:
    # When `lowmem train --resume` launched the trainer: a start, done, error, pause or resume
    # written before it is an earlier session's, so the status waits for the new `start`.
    since: float | None = None
    config: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    start: dict | None = None
    last_step: dict | None = None
    loss: dict[int, float] = field(default_factory=dict)        # step -> training loss
    eval_loss: dict[int, float] = field(default_factory=dict)   # step -> held-out loss
    lr: dict[int, float] = field(default_factory=dict)          # step -> learning rate
    last_eval: dict | None = None
    evaluating: dict | None = None   # the running evaluation's latest `evaluating` event
    paused: bool = False
    done: dict | None = None
    error: dict | None = None
    trainer_gone: bool = False
    quiet: str = ""              # why a trainer on another host may be gone, while it says nothing
    problems: list[str] = field(default_factory=list)
    events_read: int = 0
    updates: int = 0

    def apply(self, update: Update) -> None:
        if update.restarted:   # the run started over: what came before is gone
            fresh = RunState(since=self.since, config=self.config, plan=self.plan, problems=self.problems)
            self.__dict__.update(fresh.__dict__)
        # A file read well again clears what was said about it (a resume rewrote it mid-read).
        for name, read in (("config.yaml", update.config), ("plan.yaml", update.plan)):
            if read is not None:
                self.problems = [p for p in self.problems if not p.startswith(name)]
        if update.config is not None:
            self.config = update.config
        if update.plan is not None:
            self.plan = update.plan
        self.problems.extend(update.problems)
        for event in update.events:
            self.apply_event(event)
        if update.trainer_gone:
            self.trainer_gone = True
        if update.quiet is not None:
            self.quiet = update.quiet
        self.updates += 1

    def apply_event(self, event: dict) -> None:
        self.events_read += 1
        kind = event.get("kind")
        if is_history(event, self.since) and kind not in ("step", "eval"):
            # An earlier session's: its losses still chart, its start, end or pause say nothing
            # now; it is only logged.
            kind = None
        if kind in ("eval", "step", "start", "paused", "error", "done"):
            self.evaluating = None     # the evaluation it reported on is over
        if kind == "step":
            step = event.get("step")
            self.last_step = event
            if isinstance(step, int):
                # A dict keyed by step: a resumed run that repeats a step overwrites it.
                if is_number(event.get("loss")):
                    self.loss[step] = float(event["loss"])
                if is_number(event.get("lr")):
                    self.lr[step] = float(event["lr"])
            return
        if kind == "evaluating":
            self.evaluating = event
        elif kind == "start":
            # A resume appends a new `start`: the run is live again.
            self.start = event
            self.done = self.error = None
            self.trainer_gone = self.paused = False
        elif kind == "eval":
            self.last_eval = event
            if isinstance(event.get("step"), int) and is_number(event.get("loss")):
                self.eval_loss[event["step"]] = float(event["loss"])
        elif kind == "paused":
            self.paused = True
        elif kind == "resumed":
            self.paused = False
        elif kind == "error":
            self.error = event
        elif kind == "done":
            self.done = event
            self.paused = False

    # ------------------------------------------------------------ derived figures

    @property
    def status(self) -> str:
        """waiting | running | paused | finished | stopped | interrupted | crashed | ended"""
        if self.error is not None:
            return "crashed"
        if self.done is not None:
            return str(self.done.get("reason") or "finished")
        if self.trainer_gone:
            return "ended"
        if self.start is None and (self.last_step is None or self.since is not None):
            return "waiting"
        return "paused" if self.paused else "running"

    @property
    def over(self) -> bool:
        """The trainer will write nothing more: there is nothing to control."""
        return self.done is not None or self.error is not None or self.trainer_gone

    @property
    def step(self) -> int | None:
        if self.last_step is not None:
            return self.last_step.get("step")
        return None if self.done is None else self.done.get("step")

    @property
    def total_steps(self) -> int | None:
        for source, key in ((self.last_step, "steps"), (self.start, "steps"), (self.config, "steps")):
            if source and isinstance(source.get(key), int):
                return source[key]
        return None

    @property
    def elapsed_s(self) -> float | None:
        if self.last_step and is_number(self.last_step.get("elapsed_s")):
            return float(self.last_step["elapsed_s"])
        if self.last_step and self.start and is_number(self.last_step.get("t")) and is_number(self.start.get("t")):
            return float(self.last_step["t"]) - float(self.start["t"])
        return None

    @property
    def eta_s(self) -> float | None:
        if self.over:
            return None
        if self.last_step and is_number(self.last_step.get("eta_s")):
            return float(self.last_step["eta_s"])
        step, total, elapsed = self.step, self.total_steps, self.elapsed_s
        if step and total and elapsed is not None:
            return elapsed / step * max(total - step, 0)
        return None

    @property
    def mem(self) -> dict:
        return (self.last_step or {}).get("mem") or {}

    @property
    def device(self) -> str:
        for source in (self.start, self.plan, self.config):
            if source and source.get("device") in ("cpu", "cuda"):
                return source["device"]
        return "cuda" if "allocated" in self.mem or "device_total" in self.mem else "cpu"

    @property
    def budget(self) -> int | None:
        """The memory budget in bytes: the plan's, else the config's, else the device's size."""
        for source in (self.plan, self.config):
            vram = source.get("vram")
            if isinstance(vram, str):           # a config.yaml writes sizes as typed: 24G
                from lowmem.config import parse_size

                try:
                    vram = parse_size(vram)
                except ValueError:
                    continue
            if is_number(vram) and vram > 0:
                return int(vram)
        if self.device == "cuda" and is_number(self.mem.get("device_total")):
            return int(self.mem["device_total"])
        return None

    @property
    def breakdown(self) -> dict[str, int]:
        """The planner's predicted bytes per term (may be empty)."""
        raw = self.plan.get("breakdown")
        if not isinstance(raw, dict):
            return {}
        # `host` is pinned CPU memory for offloaded activations, not on the device: not a term here.
        return {str(k): int(v) for k, v in raw.items() if is_number(v) and k != "host"}

    @property
    def planned_host(self) -> int | None:
        """Pinned host bytes the plan predicts for offloaded activations, when it offloads."""
        raw = self.plan.get("breakdown")
        value = raw.get("host") if isinstance(raw, dict) else None
        return int(value) if is_number(value) and value > 0 else None

    @property
    def run_name(self) -> str:
        for source, key in ((self.start, "run"), (self.config, "name")):
            if source and source.get(key):
                return str(source[key])
        return ""

    def lookup(self, *keys: str) -> Any:
        """The first of `keys` found in the plan, its `extra`, the start event or the config."""
        extra = self.plan.get("extra") if isinstance(self.plan.get("extra"), dict) else {}
        for source in (self.plan, extra, self.start or {}, self.config):
            for key in keys:
                if source.get(key) not in (None, ""):
                    return source[key]
        return None


