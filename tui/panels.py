"""The dashboard's panels. Each reads a `RunState` in `show()` and draws itself for its size.

Panels render from the state at paint time, so a resize redraws them to fit
(a narrower bar, fewer plan lines) rather than cutting them off.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.widget import Widget
from textual.widgets import RichLog

from lowmem.events import evaluation_progress, is_number

from .describe import describe_event, fmt_bytes, fmt_duration, fmt_number, fmt_rate
from .state import RunState

# At 90% of the budget a bar turns to the warning colour: allocator fragmentation and
# the spikes between two measurements make the last tenth of a budget unsafe to plan into.
WARN_FRACTION = 0.9

_EIGHTHS = " ▏▎▍▌▋▊▉"

STATUS_TEXT = {
    "waiting": "○ WAITING FOR TRAINER",
    "running": "● RUNNING",
    "paused": "❚❚ PAUSED",
    "finished": "✔ FINISHED",
    "stopped": "■ STOPPED",
    "interrupted": "■ INTERRUPTED",
    "crashed": "✖ CRASHED",
    "ended": "✖ TRAINER GONE",
}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Panel(Widget):
    """A widget drawn from the run state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = RunState()

    def show(self, state: RunState) -> None:
        self.state = state
        self.refresh()


class TitleBar(Panel):
    """Run name, model and method on the left; the run's status on the right."""

    COMPONENT_CLASSES = {"titlebar--name", *(f"titlebar--{status}" for status in STATUS_TEXT)}

    def render(self) -> Text:
        s = self.state
        # On CUDA the trainer names its GPU (probed through cuda-python) in its start event.
        where = s.lookup("gpu") or s.device
        # ...and whether lowmem.kernels run there ("on", or why not): off costs memory the plan counted.
        kernels = "kernels off" if s.lookup("kernels") not in (None, "on") else None
        what = " · ".join(str(v) for v in (s.lookup("model"), s.lookup("method"), where, kernels) if v)
        left = Text.assemble(("lowmem ", "bold"), (s.run_name or str(self.app.run_dir.name),
                                                   self.get_component_rich_style("titlebar--name")))
        if what:
            left.append(f"  {what}")
        status = STATUS_TEXT.get(s.status, s.status.upper())
        status_class = f"titlebar--{s.status}" if s.status in STATUS_TEXT else "titlebar--running"
        right = Text(f" {status} ", style=self.get_component_rich_style(status_class))
        room = self.size.width - right.cell_len - 1
        left.truncate(max(room, 0), overflow="ellipsis")
        left.pad_right(max(room - left.cell_len, 0) + 1)
        return left + right


class Banner(Panel):
    """Shown only when something went wrong: the trainer's error, or the trainer gone."""

    def show(self, state: RunState) -> None:
        super().show(state)
        self.set_class(bool(self.message), "-visible")

    @property
    def message(self) -> str:
        s = self.state
        if s.error is not None:
            at = f" at step {s.error['step']}" if s.error.get("step") is not None else ""
            return f"✖ The trainer failed{at}: {s.error.get('message', 'no message')}"
        if s.trainer_gone:
            at = f" after step {s.step}" if s.step is not None else ""
            return f"✖ trainer process ended without finishing{at}: no `done` event"
        if s.quiet and not s.over:
            return "⚠ " + s.quiet
        if s.problems:
            return "⚠ " + s.problems[-1]
        return ""

    def render(self) -> Text:
        return Text(self.message)


class ProgressStrip(Panel):
    """Step/total with a bar, elapsed, ETA, tokens/s; then loss, eval loss, lr, grad norm."""

    COMPONENT_CLASSES = {"progress--bar", "progress--track", "progress--label", "progress--pending"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: list[str] = []

    def render(self) -> Text:
        s, width = self.state, self.size.width
        label = self.get_component_rich_style("progress--label")
        step, total = s.step, s.total_steps
        head = Text.assemble(("step ", label), f"{step if step is not None else '-'}/{total or '-'} ")
        tail = Text.assemble(
            ("  elapsed ", label), fmt_duration(s.elapsed_s),
            ("  eta ", label), "-" if s.over else fmt_duration(s.eta_s),
            ("  ", label), fmt_rate((s.last_step or {}).get("tokens_per_s")), (" tok/s", label))
        bar_w = width - head.cell_len - tail.cell_len - 5
        line1 = head
        if bar_w >= 6:
            frac = min(max((step or 0) / total, 0.0), 1.0) if total else 0.0
            filled = round(frac * bar_w)
            line1.append("█" * filled, self.get_component_rich_style("progress--bar"))
            line1.append("░" * (bar_w - filled), self.get_component_rich_style("progress--track"))
            line1.append(f" {frac:4.0%}")
        line1.append_text(tail)

        last = s.last_step or {}
        line2 = Text.assemble(("loss ", label), fmt_number(last.get("loss")))
        if s.evaluating is not None and not s.over:
            line2.append_text(Text.assemble(("  evaluating ", label), evaluation_progress(s.evaluating)))
        elif s.last_eval is not None:
            line2.append_text(Text.assemble(("  eval ", label), fmt_number(s.last_eval.get("loss"))))
            em = s.last_eval.get("exact_match")
            if is_number(em):        # as the console and the event log say it: a share of the examples
                line2.append_text(Text.assemble(("  exact ", label), f"{em:.1%}"))
        # The learning rate and gradient norm as the console's step line writes them.
        lr = last.get("lr")
        line2.append_text(Text.assemble(("  lr ", label), f"{lr:.2e}" if is_number(lr) else "-"))
        if is_number(last.get("grad_norm")):
            line2.append_text(Text.assemble(("  grad ", label), f"{last['grad_norm']:.3f}"))
        if self.pending:
            line2.append(f"  ⧗ sent: {', '.join(self.pending)}",
                         self.get_component_rich_style("progress--pending"))
        for line in (line1, line2):
            line.truncate(width, overflow="ellipsis")
        return Text("\n").join([line1, line2])


# Plan fields that switch a memory technique on, with the words shown for them.
TECHNIQUES = (
    (("grad_checkpointing", "activation_checkpointing"), "grad ckpt"),
    (("activation_offload", "offload_activations", "offload"), "offload"),
    (("chunked_loss", "loss_chunk", "loss_chunk_size"), "chunked loss"),
    (("galore_per_layer",), "per-layer updates"),
    (("double_quant",), "double quant"),
    (("paged_optimizer",), "paged optimizer"),
)


class PlanPanel(Panel):
    """The plan at a glance; three lines when the panel is short."""

    COMPONENT_CLASSES = {"plan--key"}

    def facts(self) -> list[tuple[str, str]]:
        s = self.state
        out = []

        def add(key: str, value: object) -> None:
            if value not in (None, "", [], ()):
                out.append((key, str(value)))

        add("model", s.lookup("model"))
        add("method", s.lookup("method"))
        weights = s.lookup("base_format", "weights_format")
        group = s.lookup("quant_group")
        if weights and group:
            weights = f"{weights} (group {group})"
        compute = s.lookup("compute_dtype")
        add("weights", f"{weights} · compute {compute}" if weights and compute else weights)
        rank = s.lookup("lora_rank", "rank", "galore_rank")
        if rank:
            alpha = s.lookup("lora_alpha")
            targets = s.lookup("lora_targets") or ()
            text = f"r{rank}" + (f" α{alpha:g}" if isinstance(alpha, (int, float)) else "")
            add("rank", text + (f" · {len(targets)} targets" if targets else ""))
        prune = s.lookup("prune_ratio")
        if isinstance(prune, (int, float)) and prune:
            add("prune", f"{prune:.0%}")
        mb, accum, seq = s.lookup("micro_batch"), s.lookup("grad_accum"), s.lookup("seq_len")
        if mb:
            tokens = s.lookup("tokens_per_step")
            add("batch", f"{mb}×{accum or 1} · seq {seq or '-'}"
                + (f" · {tokens:,} tok/step" if isinstance(tokens, int) else ""))
        optimizer, bits = s.lookup("optimizer"), s.lookup("optimizer_state_bits")
        add("optimizer", f"{optimizer} {bits}-bit states" if optimizer and bits else optimizer)
        add("on", ", ".join(self.techniques()) or "none")
        return out

    def techniques(self) -> list[str]:
        on = []
        for keys, words in TECHNIQUES:
            value = self.state.lookup(*keys)
            if keys == ("double_quant",) and not str(self.state.lookup("base_format") or "").startswith("nf4"):
                continue  # a setting of the NF4 format: meaningless over a bf16/fp32 base
            if value and value not in ("off", "none", "false"):
                on.append(words)
        return on

    def show(self, state: RunState) -> None:
        self.state = state
        self.refresh(layout=True)             # its height follows the number of facts

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(len(self.facts()), 1)

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        facts = self.facts()
        key_style = self.get_component_rich_style("plan--key")
        if not self.state.plan and not self.state.config:
            return Text("no plan.yaml yet", style=key_style)
        if len(facts) > height:
            # Short panel: pack the facts into as many lines as it has, in order of importance.
            s = self.state
            rank = s.lookup("lora_rank", "rank", "galore_rank")
            prune = dict(facts).get("prune")
            mb, accum, seq = s.lookup("micro_batch"), s.lookup("grad_accum"), s.lookup("seq_len")
            packed = [
                " · ".join(str(v) for v in (s.lookup("model"), s.lookup("method"),
                                            s.lookup("base_format", "weights_format")) if v),
                " · ".join(v for v in (rank and f"r{rank}", prune and f"prune {prune}",
                                       mb and f"batch {mb}×{accum or 1}", seq and f"seq {seq}") if v),
                "on: " + (", ".join(self.techniques()) or "none"),
            ]
            return Text("\n".join(_clip(line, width) for line in packed[:max(height, 1)]))
        key_w = max(len(k) for k, _ in facts) + 1
        text = Text(no_wrap=True)
        for i, (key, value) in enumerate(facts):
            text.append(key.ljust(key_w), key_style)
            text.append(_clip(value, width - key_w) + ("\n" if i < len(facts) - 1 else ""))
        return text


class MemoryPanel(Panel):
    """Planned bytes per term beside the measured figures, as bars against the budget."""

    COMPONENT_CLASSES = {"memory--ok", "memory--warn", "memory--over", "memory--budget",
                         "memory--track", "memory--heading", "memory--label"}

    def rows(self) -> list[tuple[str, str, object]]:
        """(kind, label, value): kind is heading | bar | text | note."""
        s = self.state
        mem, breakdown = s.mem, s.breakdown
        rows: list[tuple[str, str, object]] = []
        budget = s.budget
        rows.append(("note", "budget", fmt_bytes(budget) if budget else "none set"))
        # Terms the plan puts at nothing (no gradients to keep, no temporaries) take no row.
        terms = [(k, v) for k, v in breakdown.items() if k != "total" and v != 0]
        total = breakdown.get("total", sum(v for _, v in terms) if terms else None)
        if terms or total is not None:
            rows.append(("heading", "planned", None))
            rows += [("bar", k, v) for k, v in terms]
            rows.append(("bar", "total", total))
        if s.planned_host is not None:
            # Offloaded activations in pinned host memory: not on the device, so not a bar.
            rows.append(("text", "host pinned", fmt_bytes(s.planned_host)))
        step = s.step
        rows.append(("heading", f"measured · {s.device}" + (f" · step {step}" if step is not None else ""), None))
        if not mem:
            rows.append(("note", "", "no measurement yet"))
        for key, label in (("peak", "peak"), ("allocated", "allocated"), ("reserved", "reserved")):
            if mem.get(key) is not None:
                rows.append(("bar", label, mem[key]))
        if mem.get("device_free") is not None:
            of = f" of {fmt_bytes(mem['device_total'])}" if mem.get("device_total") else ""
            rows.append(("text", "dev free", fmt_bytes(mem["device_free"]) + of))
        if mem.get("outside") is not None:
            # The CUDA context and anything else on the GPU: the plan's "overhead" less fragmentation.
            rows.append(("text", "context", fmt_bytes(mem["outside"])))
        if mem.get("peak_rss") is not None and s.device == "cpu":
            # On the CPU the run's memory is its resident set: its peak is what the plan predicts.
            rows.append(("bar", "peak rss", mem["peak_rss"]))
        if mem.get("rss") is not None:
            # On a GPU run the RSS is host memory and is not measured against the VRAM budget.
            rows.append(("bar", "rss", mem["rss"]) if s.device == "cpu" else ("text", "host rss", fmt_bytes(mem["rss"])))
        return rows

    def fit(self, rows: list[tuple[str, str, object]], height: int) -> list[tuple[str, str, object]]:
        """Drop the least important rows until they fit; planned total and peak stay longest.

        The planned terms are shown all or none: half a breakdown reads as a whole one.
        """
        if len(rows) <= height:
            return rows
        # Without the "planned" heading, the total must say whose total it is.
        rows = [("bar", "plan total", r[2]) if r[:2] == ("bar", "total") else r
                for r in rows if r[0] != "heading"]
        terms = set(self.state.breakdown) - {"total"}
        dropped: list[set[str]] = []
        for drop in (("dev free", "context"), ("host rss", "host pinned"), ("reserved",), terms,
                     ("budget",), ("allocated",)):
            if sum(1 for r in rows if r[1] not in set().union(*dropped)) <= height:
                break
            dropped.append(set(drop))
        # The planned terms go all at once, which may free more rows than needed: what went
        # before them comes back, the most important first, while it fits.
        for group in reversed(dropped[:-1]):
            back = set().union(*(g for g in dropped if g is not group))
            if sum(1 for r in rows if r[1] not in back) <= height:
                dropped.remove(group)
        gone = set().union(*dropped)
        return [r for r in rows if r[1] not in gone][:max(height, 1)]

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        rows = self.fit(self.rows(), height)
        budget = self.state.budget
        values = [v for kind, _, v in rows if kind == "bar" and isinstance(v, (int, float))]
        scale = max(values + ([budget] if budget else []) + [1])
        label_w, value_w = 12, 9
        bar_w = max(width - label_w - value_w - 1, 1)
        style = self.get_component_rich_style
        text = Text(no_wrap=True, overflow="crop")
        for i, (kind, label, value) in enumerate(rows):
            if kind == "heading":
                text.append(_clip(label, width), style("memory--heading"))
            elif kind in ("note", "text"):
                text.append(label.ljust(label_w) if label else "", style("memory--label"))
                text.append(_clip(str(value), width - (label_w if label else 0)))
                if kind == "note" and label == "budget" and budget:
                    text.append("  ┃", style("memory--budget"))
            else:
                text.append(_clip(label, label_w - 1).ljust(label_w), style("memory--label"))
                text.append_text(self._bar(value, scale, budget, bar_w))
                text.append(fmt_bytes(value).rjust(value_w + 1))
            if i < len(rows) - 1:
                text.append("\n")
        return text

    def _bar(self, value: object, scale: float, budget: int | None, width: int) -> Text:
        style = self.get_component_rich_style
        if not isinstance(value, (int, float)):
            return Text(" " * width)
        ratio = value / budget if budget else 0.0
        fill = style("memory--over" if ratio > 1 else "memory--warn" if ratio >= WARN_FRACTION else "memory--ok")
        cells = value / scale * width
        full = int(cells)
        part = _EIGHTHS[int((cells - full) * 8)] if full < width else ""
        if value > 0 and full == 0 and part == " ":
            part = "▏"                       # a term that exists is never drawn as nothing
        chars = list("█" * full + part.strip())
        styles = [fill] * len(chars)
        chars += ["─"] * (width - len(chars))
        styles += [style("memory--track")] * (width - len(styles))
        if budget:
            mark = min(max(math.ceil(budget / scale * width) - 1, 0), width - 1)
            chars[mark] = "┃"
            styles[mark] = style("memory--over") if ratio > 1 else style("memory--budget")
        bar = Text()
        for ch, st in zip(chars, styles):
            bar.append(ch, st)
        return bar


class EventLogPanel(RichLog):
    """Checkpoints, evals, control acknowledgements, warnings and errors, newest last."""

    KIND_CLASSES = {"error": "log--error", "warning": "log--warning", "checkpoint": "log--checkpoint",
                    "eval": "log--eval", "control": "log--control", "done": "log--done",
                    "start": "log--start", "paused": "log--control", "resumed": "log--control"}
    COMPONENT_CLASSES = {"log--time", *KIND_CLASSES.values()}

    MAX_LINES = 500     # what a replay of a long run draws at once, and what the log keeps; older
                        # lines scroll out of memory, not just off screen

    def __init__(self, **kwargs):
        super().__init__(wrap=True, min_width=20, markup=False, highlight=False, max_lines=self.MAX_LINES,
                         **kwargs)
        self.lines_written = 0
        self._origin_t: float | None = None

    def restart(self) -> None:
        """Forget what was shown: the run started over."""
        self.clear()
        self.lines_written = 0
        self._origin_t = None

    def add_events(self, events: list[dict]) -> None:
        if self._origin_t is None:       # times count from the start, which may be left out below
            self._origin_t = next((e.get("t") for e in events if e.get("kind") == "start"), None)
        shown = [(event, line) for event in events if (line := describe_event(event)) is not None]
        for event, line in shown[-self.MAX_LINES:]:
            t = event.get("t")
            since = fmt_duration(t - self._origin_t) if isinstance(t, (int, float)) and self._origin_t else "-"
            kind_class = self.KIND_CLASSES.get(str(event.get("kind")))
            text = Text.assemble((f"{since:>7} ", self.get_component_rich_style("log--time")),
                                 (line, self.get_component_rich_style(kind_class) if kind_class else ""))
            self.write(text)
            self.lines_written += 1
