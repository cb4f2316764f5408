"""DashboardApp: watches one run directory and sends control requests to its trainer.

Data flows one way: a worker thread polls the run directory (`RunReader`) and
posts each `Update` as a message; the app folds it into a `RunState` on the UI
thread and hands that to the panels. Keys write to the run's `control` file and
nothing else: the trainer's acknowledgement arrives later, as an event.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.markup import escape
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from lowmem.events import CONTROL_FILE, send_control

from .chart import LineChart, Series
from .describe import fmt_number
from .panels import Banner, EventLogPanel, MemoryPanel, PlanPanel, ProgressStrip, TitleBar
from .reader import RunReader, Update
from .screens import HelpScreen, QuitScreen
from .state import RunState

# Below either size the layout goes compact: the lr chart folds into the progress
# line and the plan into three lines, so 80×24 keeps every essential figure.
COMPACT_WIDTH = 100
COMPACT_HEIGHT = 32
# Below this height the plan panel gives its rows to memory (the title still names model and
# method): the planned total and the measured peak must stay on screen.
SHORT_HEIGHT = 20
# Below this the panels cannot show a figure whole: a note says so, and what still works.
TINY_WIDTH = 60
TINY_HEIGHT = 14


class RunUpdated(Message):
    """The reader found something new in the run directory."""

    def __init__(self, update: Update) -> None:
        super().__init__()
        self.update = update


class DashboardScreen(Screen):
    """The panels. It folds to its compact layout whenever it is resized below 100×32."""

    def compose(self) -> ComposeResult:
        yield TitleBar(id="title")
        yield Banner(id="banner")
        yield ProgressStrip(id="progress")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield PlanPanel(id="plan")
                yield MemoryPanel(id="memory")
            with Vertical(id="right"):
                yield LineChart("waiting for the first step", id="loss")
                yield LineChart("no learning rate yet", id="lr", y_format=lambda y: fmt_number(y, 2))
        yield EventLogPanel(id="log")
        yield Static(f"The terminal is too small for the panels (at least {TINY_WIDTH}×{TINY_HEIGHT}; 80×24 shows "
                     f"them all). The keys still work: p pause, s save, q quit. For plain lines instead: "
                     f"lowmem monitor {escape(str(getattr(self.app, 'run_dir', 'RUN_DIR')))} --no-tui.",
                     id="too-small")
        yield Footer()

    def on_mount(self) -> None:
        for panel_id, title in (("plan", "plan"), ("memory", "memory"), ("loss", "loss"),
                                ("lr", "learning rate"), ("log", "events")):
            self.query_one(f"#{panel_id}").border_title = title
        self._fit(self.app.size)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size)

    def _fit(self, size: Size) -> None:
        self.set_class(size.width < COMPACT_WIDTH or size.height < COMPACT_HEIGHT, "-compact")
        self.set_class(size.height < SHORT_HEIGHT, "-short")
        self.set_class(size.width < TINY_WIDTH or size.height < TINY_HEIGHT, "-tiny")

    def show(self, state: RunState, pending: list[str], new_events: list[dict], restarted: bool = False,
             more: bool = False) -> None:
        """With `more` (a long log read a chunk at a time, more to come) only the event log
        takes the new events; the panels and charts are drawn once the reader catches up."""
        log = self.query_one(EventLogPanel)
        if restarted:        # events.jsonl was replaced: the log starts over with it
            log.restart()
        log.add_events(new_events)
        if more:
            return
        for panel in self.query("TitleBar, Banner, ProgressStrip, PlanPanel, MemoryPanel"):
            panel.show(state)
        self.query_one(ProgressStrip).pending = pending
        loss = self.query_one("#loss", LineChart)
        loss.set_series([Series("train", sorted(state.loss.items())),
                         Series("eval", sorted(state.eval_loss.items()), marker=True)])
        loss.border_subtitle = " · ".join(
            f"{name} {fmt_number(series[max(series)])}"
            for name, series in (("train", state.loss), ("eval", state.eval_loss)) if series)
        self.query_one("#lr", LineChart).set_series([Series("lr", sorted(state.lr.items()))])


class DashboardApp(App[str]):
    """The live view of a run directory. Its return value is what the user chose on exit."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "lowmem dashboard"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("s", "save", "Save now"),
        Binding("q", "quit_prompt", "Quit"),
        # Ctrl-C stops a run in the plain mode: here it asks the same question as q (stop with a
        # checkpoint, or detach), rather than Textual's hint to press ctrl+q, which detached.
        Binding("ctrl+c", "quit_prompt", show=False, priority=True),
        Binding("ctrl+q", "quit_prompt", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self, run_dir: str | Path, *, poll_s: float = 0.5, check_trainer: bool = True,
                 since: float | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.poll_s = poll_s
        self.check_trainer = check_trainer
        self.since = since                       # `lowmem train --resume`: when it launched the trainer
        self.state = RunState(since=since)
        self.pending: dict[str, str] = {}        # control request id -> request, until acknowledged
        self.pause_wanted: bool | None = None    # what `p` last asked for, until the trainer says
        self.dashboard = DashboardScreen(id="dashboard")
        self._applied = threading.Event()         # the reader's last update is applied
        self._applied.set()

    def get_default_screen(self) -> Screen:
        return self.dashboard

    def on_ready(self) -> None:
        # Ready comes once the dashboard screen has its panels; reading starts then.
        self._show()
        self.read_run()

    # ------------------------------------------------------------ reading

    @work(thread=True, exclusive=True, group="reader")
    def read_run(self) -> None:
        """Polls the run directory until the app closes; never touches widgets."""
        worker = get_current_worker()
        reader = RunReader(self.run_dir, check_trainer=self.check_trainer, since=self.since)
        while not worker.is_cancelled:
            update = reader.poll()
            if update:
                self._applied.clear()
                self.post_message(RunUpdated(update))
            if reader.behind:
                # A long log comes a chunk at a time, each once the last is on screen, so no
                # more than one chunk's events wait in memory.
                while not worker.is_cancelled and not self._applied.wait(0.05):
                    pass
                continue
            deadline = time.monotonic() + self.poll_s
            while not worker.is_cancelled and time.monotonic() < deadline:
                time.sleep(min(0.05, self.poll_s))

    def on_run_updated(self, message: RunUpdated) -> None:
        update = message.update
        self.state.apply(update)
        self._applied.set()
        for event in update.events:
            kind = event.get("kind")
            if kind == "control":
                self.pending.pop(str(event.get("id")), None)
            elif kind in ("paused", "resumed", "start", "done"):
                self.pause_wanted = None
        if self.state.over:
            self.pending.clear()
            if isinstance(self.screen, QuitScreen):   # its question is about a live run
                self.pop_screen()
                self.notify(f"the run is {self.state.status}", severity="information")
        self._show(update.events, update.restarted, update.behind)

    def _show(self, new_events: list[dict] = (), restarted: bool = False, more: bool = False) -> None:
        # The dashboard screen, not `self.screen`: a help or quit dialog may be on top.
        self.dashboard.show(self.state, list(self.pending.values()), list(new_events), restarted, more)

    def _write_control(self, request: str) -> str | None:
        """send_control, or a notification why it could not be sent (a run directory this
        user cannot write: someone else's run, a read-only mount)."""
        try:
            return send_control(self.run_dir, request)
        except OSError as e:
            self.notify(f"cannot ask the trainer to {request}: {self.run_dir / CONTROL_FILE}: "
                        f"{e.strerror or e}", severity="error")
            return None

    # ------------------------------------------------------------ keys

    def _send(self, request: str) -> str | None:
        if self.state.over:
            self.notify(f"the run is {self.state.status}: nothing to {request}", severity="warning")
            return None
        if self.state.start is None:
            # Nothing to pause or save before the trainer's `start`; q can still stop it.
            self.notify(f"the trainer has not started yet: {request} not sent", severity="warning")
            return None
        request_id = self._write_control(request)
        if request_id is None:
            return None
        self.pending[request_id] = request
        self._show()
        return request_id

    def action_toggle_pause(self) -> None:
        paused = self.state.paused if self.pause_wanted is None else self.pause_wanted
        if self._send("resume" if paused else "pause"):
            self.pause_wanted = not paused

    def action_save(self) -> None:
        self._send("save")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_quit_prompt(self) -> None:
        if isinstance(self.screen, QuitScreen):      # asked already: a second Ctrl-C stacks none
            return
        if self.state.over:
            self.exit(self.closing_result())
            return

        def chosen(choice: str | None) -> None:
            if choice is not None and self.state.over:     # it ended while the question was open
                self.exit(self.closing_result())
                return
            if choice in ("stop", "resume") and self._write_control(choice) is None:
                return
            if choice in ("detach", "stop", "resume"):
                self.exit("stop" if choice == "stop" else "detach")

        # A pause sent and not yet acknowledged counts: detaching would leave the run paused.
        paused = self.state.paused if self.pause_wanted is None else self.pause_wanted
        state = ("pausing (the pause is sent, not yet done)" if paused and not self.state.paused else
                 "loading: the trainer has not begun" if self.state.status == "waiting" else None)
        self.push_screen(QuitScreen(paused=paused, run_dir=str(self.run_dir), state=state), chosen)

    def closing_result(self) -> str:
        """What closing means when no choice was asked: 'finished', 'closed' or 'detach'."""
        if self.state.done is not None:
            return "finished"
        return "closed" if self.state.over else "detach"
