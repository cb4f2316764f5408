"""The dashboard's modal screens: the quit question and the help page."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

HELP = """\
[b]Keys[/b]
  [b]p[/b]  pause the trainer between steps, or resume it
  [b]s[/b]  save a checkpoint now
  [b]q[/b]  quit: detach (the run goes on) or stop (checkpoint, then stop)
  [b]?[/b]  this help

Requests go to the run directory's [i]control[/i] file; the trainer acknowledges
each one in events.jsonl and the event log shows it.

[b]Panels[/b]
  [b]plan[/b]     the planner's choices: method, precision, rank, batch, techniques
  [b]memory[/b]   planned bytes per term beside the measured ones; ┃ is the budget,
           bars turn yellow at 90% of it and red beyond it
  [b]loss[/b]     training loss per step, eval loss on top of it
  [b]lr[/b]       the learning-rate schedule so far
  [b]events[/b]   checkpoints, evals, control acknowledgements, warnings, errors

Reattach to a detached run with [b]lowmem monitor RUN_DIR[/b].
"""


QUIT_QUESTION = """\
[b]The run is {state}.[/b] Close the dashboard and…
  [b]d[/b]    detach: the run goes on; reattach with lowmem monitor {run_dir}
  [b]s[/b]    stop: the trainer saves a checkpoint, then stops
  [b]esc[/b]  cancel: stay here"""

QUIT_QUESTION_PAUSED = """\
[b]The run is {state}.[/b] Close the dashboard and…
  [b]d[/b]    detach: it stays paused; reattach with lowmem monitor {run_dir}, p resumes
  [b]r[/b]    resume it, then detach: the run goes on
  [b]s[/b]    stop: the trainer saves a checkpoint, then stops
  [b]esc[/b]  cancel: stay here"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            yield Static(HELP, id="help-text")
            yield Static("press esc to close", id="help-hint")


class QuitScreen(ModalScreen[str | None]):
    """Asks what happens to a live run: 'detach', 'stop', 'resume' (a paused run: resume it,
    then detach), or None to stay."""

    BINDINGS = [
        Binding("d", "choose('detach')", "Detach"),
        Binding("r", "choose('resume')", "Resume and detach", show=False),
        Binding("s", "choose('stop')", "Stop and save"),
        Binding("escape,c", "choose(None)", "Cancel"),
    ]

    def __init__(self, paused: bool = False, run_dir: str = "RUN_DIR", state: str | None = None) -> None:
        """`state`: what the question says the run is (default: paused, or still training)."""
        super().__init__()
        self.paused = paused
        self.run_dir = run_dir
        self.state = state or ("paused" if paused else "still training")

    def compose(self) -> ComposeResult:
        with Vertical(id="quit-dialog"):
            question = QUIT_QUESTION_PAUSED if self.paused else QUIT_QUESTION
            yield Static(question.format(state=self.state, run_dir=escape(str(self.run_dir))), id="quit-question")
            with Horizontal(id="quit-buttons"):
                yield Button("Detach", variant="primary", id="detach")
                if self.paused:
                    yield Button("Resume & detach", id="resume")
                yield Button("Stop & save", variant="error", id="stop")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_choose(None if event.button.id == "cancel" else event.button.id)

    def action_choose(self, choice: str | None) -> None:
        if choice == "resume" and not self.paused:
            return
        self.dismiss(choice)
