"""The run directory's two message streams.

`events.jsonl` — written by the trainer only, append-only, one JSON object per
line, each with `t` (unix seconds) and `kind`:

    start       run, model, method, device, steps, seq_len, tokens_per_step, pid, host
                (`this_host()`: whose pid it is); on CUDA also gpu (name, arch, memory),
                context_bytes (measured CUDA context) and kernels ("on", or why not)
    step        step, steps, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s, eta_s,
                mem: {allocated, reserved, peak, rss, device_free, device_total, outside}
                (bytes; absent fields are unknown on this device)
    evaluating  step, label, phase ("loss" | "answers"), done, total — how far an evaluation
                has got: at its start, then every EVAL_REPORT_S (lowmem.trainer) while it runs
    eval        step, loss, exact_match (may be null), examples
    checkpoint  step, path
    control     request, id, status ("done" | "ignored"), detail — the acknowledgement of a
                request read from `control`
    paused / resumed   step
    warning     message
    error       message
    done        step, reason ("finished" | "stopped" | "interrupted"), resume (command or null)

`control` — written by the dashboard (or anyone), read by the trainer between
steps: one JSON object per line `{"id": "...", "request": "pause" | "resume" |
"save" | "stop", "t": ...}`. The trainer remembers how far it has read.

Readers must tolerate a partial last line (the writer may be mid-write).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

EVENTS_FILE = "events.jsonl"
CONTROL_FILE = "control"
LOCK = ".lock"                     # held by the trainer working in the run (lowmem.checkpoint.RunLock)
CONTROL_REQUESTS = ("pause", "resume", "save", "stop")


class EventLog:
    """Appends events to `events.jsonl`; every line is flushed when written."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        # A trainer killed mid-line left a partial last line: end it, or the next event would
        # be glued to it and lost to every reader.
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")
                    self._file.flush()

    def emit(self, kind: str, **fields: Any) -> dict:
        event = {"t": round(time.time(), 3), "kind": kind, **fields}
        self._file.write(json.dumps(event, default=_jsonable) + "\n")
        self._file.flush()
        return event

    def close(self) -> None:
        self._file.close()


def run_dir_hint(path: str | Path) -> str:
    """" (did you mean runs/NAME?)" when `path` is a run's name given where its directory was
    expected (`lowmem monitor NAME`), and runs/NAME is a run; else ""."""
    path = Path(path)
    guess = Path("runs") / path
    if len(path.parts) == 1 and not path.exists() and (guess / "config.yaml").is_file():
        return f" (did you mean {guess}?)"
    return ""


def this_host() -> str:
    """The host name a trainer records in its `start` event, so a reader can tell a local
    trainer (whose pid it can watch) from one on another machine."""
    return socket.gethostname()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_COUNTS = ("step", "steps", "tokens")
_TIMES = ("t", "elapsed_s", "eta_s", "tokens_per_s")


def is_number(v: Any) -> bool:
    """An int or float as JSON gives them (not a bool, which Python counts as an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _well_typed(record: dict) -> bool:
    """Whether the fields readers compute with have the types the trainer writes: counts are
    whole numbers, times finite numbers, `mem` a mapping (a loss may be nan: a diverged step)."""
    if any(k in record and not (isinstance(record[k], int) and not isinstance(record[k], bool)) for k in _COUNTS):
        return False
    if any(k in record and not (is_number(record[k]) and math.isfinite(record[k])) for k in _TIMES):
        return False
    mem = record.get("mem")
    if mem is not None and not (isinstance(mem, dict)
                                and all(v is None or (is_number(v) and math.isfinite(v)) for v in mem.values())):
        return False
    return all(record[k] is None or is_number(record[k]) for k in ("loss", "lr", "grad_norm") if k in record)


# Readers take a file this much at a time (more only for a longer line): a long run's log is
# never held whole, in bytes or in parsed events.
READ_CHUNK = 4 << 20


def read_jsonl_tail(path: Path, offset: int = 0, limit: int | None = None,
                    skipped: list[int] | None = None) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` from byte `offset`; returns them and the new offset.

    With `limit`, it reads about that many bytes (at least one whole line, when there is
    one); the returned offset says where to go on. A last line without its newline is left
    for the next call; a complete line that is not a JSON object, or whose fields have types
    no trainer writes, is skipped (it cannot become one later), and its byte offset put in
    `skipped` when one is given.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            if limit is None:
                data = f.read()
            else:
                data = f.read(limit)
                while b"\n" not in data:    # one line longer than `limit`
                    more = f.read(limit)
                    if not more:
                        break
                    data += more
    except FileNotFoundError:
        return [], offset
    except OSError as e:     # a directory, no permission
        from lowmem.errors import CheckpointError

        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    end = data.rfind(b"\n") + 1
    records = []
    at = offset
    for line in data[:end].split(b"\n"):
        start, at = at, at + len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:   # not JSON, or not UTF-8 (the NUL bytes a power loss leaves)
            record = None
        if isinstance(record, dict) and _well_typed(record):
            records.append(record)
        elif skipped is not None:
            skipped.append(start)
    return records, offset + end


def iter_events(run_dir: Path) -> Iterator[dict]:
    """Every complete event of a run so far, read a chunk at a time."""
    offset = 0
    while True:
        events, after = read_jsonl_tail(Path(run_dir) / EVENTS_FILE, offset, READ_CHUNK)
        yield from events
        if after == offset:
            return
        offset = after


def evaluation_progress(event: dict) -> str:
    """How far an evaluation has got, from an `evaluating` event (or its fields): `scored 16/80
    examples` (the held-out loss) or `generated 40/80 answers`."""
    done, total = event.get("done", "?"), event.get("total", "?")
    if event.get("phase") == "answers":
        return f"generated {done}/{total} answers"
    return f"scored {done}/{total} examples"


def clock(seconds: float) -> str:
    """h:mm:ss."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def step_line(event: dict) -> str:
    """A `step` event (or its fields) as one line, the same in the trainer's console and in
    `lowmem monitor --no-tui`: `step  3/50  loss 2.1034  lr 4.00e-04  grad 1.208  151 tok/s
    peak 9.12GiB  0:00:31 elapsed  ETA 0:05:02` (on the CPU, the process's RSS for the peak)."""
    from lowmem.config import format_size

    def number(key: str, form: str) -> str:
        value = event.get(key)
        return format(value, form) if is_number(value) else "?"

    steps = event.get("steps")
    parts = [f"step {event.get('step', '?'):>{len(str(steps)) if steps else 1}}/{steps or '?'}",
             f"loss {number('loss', '.4f')}", f"lr {number('lr', '.2e')}"]
    if event.get("grad_norm") is not None:
        parts.append(f"grad {number('grad_norm', '.3f')}")
    if event.get("tokens_per_s") is not None:
        parts.append(f"{number('tokens_per_s', ',.0f')} tok/s")
    mem = event.get("mem") or {}
    if mem.get("peak") is not None:
        parts.append(f"peak {format_size(mem['peak'])}")
    elif mem.get("rss") is not None:
        parts.append(f"RSS {format_size(mem['rss'])}")
    if is_number(event.get("elapsed_s")):
        parts.append(f"{clock(event['elapsed_s'])} elapsed")
    if is_number(event.get("eta_s")):
        parts.append(f"ETA {clock(event['eta_s'])}")
    return "  ".join(parts)


def finished_steps(run_dir: Path) -> list[int]:
    """The steps at which the run's sessions ended `finished`, oldest first."""
    return [e["step"] for e in iter_events(run_dir)
            if e.get("kind") == "done" and e.get("reason") == "finished" and isinstance(e.get("step"), int)]


def read_events(run_dir: Path) -> list[dict]:
    """Every complete event of a run so far (for a long run, `iter_events` holds less)."""
    return list(iter_events(run_dir))


def send_control(run_dir: Path, request: str) -> str:
    """Append a control request for the trainer; returns its id."""
    if request not in CONTROL_REQUESTS:
        raise ValueError(f"unknown control request {request!r}; expected one of {CONTROL_REQUESTS}")
    request_id = uuid.uuid4().hex[:12]
    line = json.dumps({"id": request_id, "request": request, "t": round(time.time(), 3)}) + "\n"
    # One write() of a short line in append mode lands whole, even with several writers.
    fd = os.open(Path(run_dir) / CONTROL_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return request_id


class ControlReader:
    """The trainer's side of the control channel: new requests since the last poll."""

    def __init__(self, run_dir: Path, since: float | None = None):
        self.path = Path(run_dir) / CONTROL_FILE
        # Requests written before this run (or before a resume) are history, not orders; those
        # stamped at or after `since` (when the trainer began) are for this trainer, though they
        # came before it opened the channel (a stop sent while the model loaded).
        records, self.offset = read_jsonl_tail(self.path, 0)
        # A request's `t` is rounded to the millisecond: compare at that precision.
        self._early = [r for r in records if since is not None and r.get("t", 0) >= round(since, 3) - 0.001]

    def poll(self) -> list[dict]:
        records, self.offset = read_jsonl_tail(self.path, self.offset)
        records, self._early = self._early + records, []
        return [r for r in records if r.get("request") in CONTROL_REQUESTS]


def trainer_may_hold(run_dir: Path) -> bool:
    """Whether a trainer may be working in `run_dir`: False only when its lock file names no
    trainer, or one on this host that has ended. A trainer on another host (shared storage)
    cannot be checked from here, so it may. Reads the lock file only: taking the lock, even
    for a moment, could refuse a trainer starting at that instant."""
    words = lock_words(run_dir)
    if len(words) != 4 or words[0] != "pid" or not words[1].isdigit():
        return False
    return words[3] != this_host() or trainer_alive(int(words[1]), None)


def lock_words(run_dir: Path) -> list[str]:
    """The run's lock file as words, `pid N on HOST`, or [] when there is none to read."""
    try:
        return (Path(run_dir) / LOCK).read_text().split()
    except OSError:
        return []


# A process whose creation time is later than this after the `start` event is a
# different process that reused the pid, not our trainer.
_PID_REUSE_SLACK_S = 5.0


def trainer_alive(pid: int, started_t: float | None) -> bool:
    """Whether the trainer with this pid (that wrote a `start` event at `started_t`, when
    known) still runs on this host."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:   # exited, not yet reaped by `lowmem train`
            return False
        if started_t is not None and proc.create_time() > started_t + _PID_REUSE_SLACK_S:
            return False
        return True
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.AccessDenied:
        return True
