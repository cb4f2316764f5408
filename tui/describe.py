"""Events as one line of text each, for the dashboard's event log and `lowmem monitor --no-tui`.

Every figure comes from the event itself (never the wall clock), so a finished
run reads the same whenever it is replayed.
"""

from __future__ import annotations

import math
from typing import Any

from lowmem.config import format_size
from lowmem.events import evaluation_progress, is_number, step_line


def fmt_duration(seconds: float | None) -> str:
    """`1:02:03` or `2:03`; `-` when unknown."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_number(x: Any, digits: int = 4) -> str:
    """A loss, norm or rate in a few significant digits; `-` when absent."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 2, 1)}e}"
    return f"{x:.{digits}g}"


def fmt_rate(x: Any) -> str:
    """Tokens per second with a thousands separator."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_bytes(n: Any) -> str:
    if n is None or isinstance(n, bool) or not isinstance(n, (int, float)):
        return "-"
    return format_size(int(n))


def describe_event(event: dict) -> str | None:
    """One line for an event worth logging; None for `step` (the charts show those)."""
    kind = event.get("kind")
    at = f"step {event['step']}" if event.get("step") is not None else ""
    if kind == "start":
        steps = f", {event['steps']} steps" if event.get("steps") else ""
        pid = f" (pid {event['pid']})" if event.get("pid") else ""
        what = " · ".join(str(event[k]) for k in ("model", "method", "device") if event.get(k))
        return f"started {event.get('run', '')}: {what}{steps}{pid}".replace("  ", " ")
    if kind == "step":
        return None
    if kind == "eval":
        text = f"eval @ {at}: loss {fmt_number(event.get('loss'))}"
        em, examples = event.get("exact_match"), event.get("examples")
        if is_number(em):            # as training prints it: exact match 62.5% of 80
            return text + f", exact match {em:.1%}" + (f" of {examples}" if examples else "")
        return text + (f" ({examples} examples)" if examples else "")
    if kind == "evaluating":
        if not event.get("done"):
            return None     # its start: the dashboard shows it; the log waits for progress
        return f"evaluating ({event.get('label', '?')}) @ {at}: {evaluation_progress(event)}"
    if kind == "checkpoint":
        return f"checkpoint @ {at}: {event.get('path', '')}"
    if kind == "control":
        text = f"{event.get('request', '?')} request {event.get('status', 'acknowledged')}"
        return text + (f": {event['detail']}" if event.get("detail") else "")
    if kind in ("paused", "resumed"):
        return f"{kind} @ {at}" if at else kind
    if kind == "warning":
        return f"warning: {event.get('message', '')}"
    if kind == "error":
        return f"error: {event.get('message', '')}"
    if kind == "done":
        text = f"done @ {at}: {event.get('reason', 'finished')}"
        if event.get("resume"):
            return text + f"; resume with: {event['resume']}"
        # A finished run's last words: where its weights went, the held-out summary.
        closing = event.get("closing")
        return text + "".join(f"; {line}" for line in closing if isinstance(line, str)) \
            if isinstance(closing, list) else text
    return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("t", "kind"))


def plain_line(event: dict) -> str | None:
    """What `lowmem monitor --no-tui` prints for an event."""
    if event.get("kind") == "step":
        return step_line(event)     # as the trainer's console prints it
    return describe_event(event)
