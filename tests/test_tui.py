"""The dashboard (lowmem.tui) and `lowmem monitor`, driven through Textual's Pilot.

Recorded runs are built with `EventLog` and fixed timestamps, so what the
dashboard shows (elapsed, ETA, the log's times) derives from the data alone
and snapshots are stable. `write_recorded_run` and `wait_until` are meant for
reuse by the live-training test.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml
from rich.console import Console

from lowmem.errors import LowmemError
from lowmem.events import CONTROL_FILE, EVENTS_FILE, EventLog

from lowmem.tui import DashboardApp, check_run_dir, run_dashboard
from lowmem.tui.chart import LineChart
from lowmem.tui.panels import Banner, EventLogPanel, MemoryPanel, PlanPanel, ProgressStrip, TitleBar
from lowmem.tui.reader import RunReader

GiB = 2**30
T0 = 1_750_000_000.0          # fixed clock for recorded runs
STEP_S = 2.5                  # seconds per step in recorded runs
RECORDED = Path(__file__).parent / "data" / "recorded_run"

# ---------------------------------------------------------------- a recorded run

CONFIG = {
    "model": "Qwen/Qwen2.5-7B", "data": "alpaca.jsonl", "runs_dir": "runs", "name": "qwen7b-alpaca",
    "method": "qlora", "vram": 24 * GiB, "seq_len": 2048, "micro_batch": 4, "grad_accum": 8,
    "steps": 60, "lr": 2e-4, "schedule": "cosine", "warmup_steps": 5, "eval_every": 20,
    "save_every": 20, "device": "cuda", "seed": 0,
    "lora": {"rank": 64, "alpha": 16.0, "dropout": 0.05, "rslora": False,
             "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}

BREAKDOWN = {"weights": int(4.6 * GiB), "adapters": int(0.16 * GiB), "grads": int(0.16 * GiB),
             "optimizer": int(0.16 * GiB), "activations": int(9.8 * GiB), "logits": int(1.2 * GiB),
             "overhead": int(2.0 * GiB)}
BREAKDOWN["total"] = sum(BREAKDOWN.values())

PLAN = {
    "method": "qlora", "base_format": "nf4", "lora_rank": 64, "lora_alpha": 16.0,
    "lora_targets": CONFIG["lora"]["targets"], "lora_dropout": 0.05, "lora_rslora": False,
    "optimizer": "adamw", "optimizer_state_bits": 8, "grad_checkpointing": True,
    "micro_batch": 4, "grad_accum": 8, "seq_len": 2048, "device": "cuda",
    "compute_dtype": "bfloat16", "vram": 24 * GiB,
    "reasons": ["bf16 weights (15.2GiB) leave no room for activations at seq 2048"],
    "extra": {"activation_offload": True, "chunked_loss": True},
    "tokens_per_step": 4 * 8 * 2048, "breakdown": BREAKDOWN,
}


def recorded_loss(step: int) -> float:
    return round(0.9 + 1.9 * math.exp(-step / 18) + 0.04 * math.sin(step * 1.7), 4)


def recorded_lr(step: int, steps: int, peak: float = 2e-4, warmup: int = 5) -> float:
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def recorded_events(*, steps: int = 60, upto: int | None = None, finished: bool = True,
                    crash_at: int | None = None, pid: int = 4242, t0: float = T0,
                    device: str = "cuda") -> list[dict]:
    """The events of a QLoRA run: steps, evals and checkpoints every 20, a pause, a warning, done."""
    upto = steps if upto is None else upto
    events = [dict(t=t0, kind="start", run="qwen7b-alpaca", model="Qwen/Qwen2.5-7B", method="qlora",
                   device=device, steps=steps, seq_len=2048, tokens_per_step=65536, pid=pid)]
    t = t0 + 20.0                                   # model load
    for step in range(1, upto + 1):
        t += STEP_S
        if device == "cuda":
            mem = {"allocated": int((16.9 + 0.002 * step) * GiB), "reserved": int(18.6 * GiB),
                   "peak": int(min(19.5 + 0.05 * step, 21.9) * GiB), "rss": int(3.2 * GiB),
                   "device_free": int(61.0 * GiB), "device_total": 80 * GiB}
        else:
            mem = {"rss": int((1.1 + 0.001 * step) * GiB), "peak_rss": int((1.2 + 0.001 * step) * GiB)}
        events.append(dict(t=round(t, 3), kind="step", step=step, steps=steps, loss=recorded_loss(step),
                           lr=recorded_lr(step, steps), grad_norm=round(0.8 + 0.3 * math.cos(step), 3),
                           tokens=65536 * step, tokens_per_s=26214.4, elapsed_s=round(t - t0, 3),
                           eta_s=(steps - step) * STEP_S, mem=mem))
        if step == crash_at:
            events.append(dict(t=round(t + 0.5, 3), kind="error", step=step,
                               message="CUDA out of memory: tried to allocate 2.00 GiB"))
            return events
        if step == 12:
            events += [dict(t=round(t + 0.1, 3), kind="control", request="pause", id="a1", status="done", detail=""),
                       dict(t=round(t + 0.1, 3), kind="paused", step=step)]
            t += 30.0
            events += [dict(t=round(t, 3), kind="control", request="resume", id="a2", status="done", detail=""),
                       dict(t=round(t, 3), kind="resumed", step=step)]
        if step == 33:
            events.append(dict(t=round(t + 0.2, 3), kind="warning",
                               message="peak memory 91% of the 24.00GiB budget"))
        if step % 20 == 0:
            t += 4.0
            events.append(dict(t=round(t, 3), kind="eval", step=step, loss=round(recorded_loss(step) + 0.12, 4),
                               exact_match=round(0.2 + step / 200, 3), examples=64))
            t += 1.0
            events.append(dict(t=round(t, 3), kind="checkpoint", step=step, path=f"checkpoints/step-{step}"))
    if finished and upto == steps:
        events.append(dict(t=round(t + 0.5, 3), kind="done", step=steps, reason="finished", resume=None))
    return events


def write_recorded_run(run_dir: Path, events: list[dict] | None = None, *,
                       config: dict | None = CONFIG, plan: dict | None = PLAN) -> Path:
    """A run directory as `lowmem train` leaves it: config.yaml, plan.yaml, events.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if plan is not None:
        (run_dir / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    log = EventLog(run_dir)
    for event in recorded_events() if events is None else events:
        log.emit(event["kind"], **{k: v for k, v in event.items() if k != "kind"})
    log.close()
    return run_dir


async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the app run until `predicate()` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the dashboard")
        await pilot.pause(0.05)
    await pilot.pause()               # let the layout and the panels catch up with the state


def screen_text(app) -> str:
    """The whole screen as plain text, as a terminal would show it."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(),
                      force_terminal=True, record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def panel_text(app, selector: str) -> str:
    """What a panel draws for its current size, without its border."""
    return app.query_one(selector).render().plain


def control_requests(run_dir: Path) -> list[str]:
    path = run_dir / CONTROL_FILE
    if not path.exists():
        return []
    return [json.loads(line)["request"] for line in path.read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    return write_recorded_run(tmp_path / "run")


@pytest.fixture
def live_run(tmp_path: Path) -> Path:
    """A run at step 25 whose trainer (this test process) is alive."""
    import time

    events = recorded_events(upto=25, finished=False, pid=os.getpid(), t0=time.time())
    return write_recorded_run(tmp_path / "run", events)


def synchronous(test):
    """Run an async test in its own event loop (no pytest-asyncio needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def loaded(app) -> Callable[[], bool]:
    return lambda: app.state.updates > 0 and app.query_one(EventLogPanel).lines_written > 0


# ---------------------------------------------------------------- errors for people

def test_a_missing_run_directory_is_a_one_line_error_before_any_screen(tmp_path):
    with pytest.raises(LowmemError, match=r"run directory .*nope does not exist"):
        run_dashboard(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(LowmemError, match="is not a directory"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(LowmemError, match="not a run directory"):
        check_run_dir(tmp_path, require_run_files=True)


# ---------------------------------------------------------------- what the panels show

@synchronous
async def test_panels_show_the_values_of_a_recorded_run(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        assert "qwen7b-alpaca" in panel_text(app, TitleBar) and "FINISHED" in panel_text(app, TitleBar)
        progress = panel_text(app, ProgressStrip)
        # elapsed comes from the last step's elapsed_s: 20 s load + 60 × 2.5 s + 30 s paused + 2 × 5 s eval.
        for expected in ("step 60/60", "100%", "elapsed 3:30", "eta -", "26,214 tok/s",
                         f"loss {recorded_loss(60):.4g}", "eval 1.128", "exact 50.0%", "lr 2.00e-05"):
            assert expected in progress
        plan = panel_text(app, PlanPanel)
        for expected in ("Qwen/Qwen2.5-7B", "qlora", "nf4", "r64 α16 · 7 targets", "4×8 · seq 2048",
                         "adamw 8-bit", "grad ckpt, offload, chunked loss"):
            assert expected in plan
        memory = panel_text(app, MemoryPanel)
        for expected in ("budget      24.00GiB", "activations", "9.80GiB", "total", "18.08GiB",
                         "peak", "21.90GiB", "reserved", "18.60GiB", "61.00GiB of 80.00GiB", "host rss    3.20GiB"):
            assert expected in memory
        loss = app.query_one("#loss", LineChart)
        assert [len(s.points) for s in loss.series] == [60, 3]
        assert loss.series[0].points[0] == (1, recorded_loss(1))
        assert app.query_one("#lr", LineChart).point_count == 60
        log = app.query_one(EventLogPanel)
        text = "\n".join(line.text for line in log.lines)
        assert "checkpoint @ step 60: checkpoints/step-60" in text
        assert "warning: peak memory 91%" in text and "pause request done" in text
        assert "done @ step 60: finished" in text
        assert "step 59" not in text                   # steps are charted, not logged


@synchronous
async def test_a_gpu_run_shows_the_probed_gpu_and_the_measured_context(tmp_path):
    """The trainer's start event names the GPU (lowmem.kernels.device); steps carry `outside`."""
    events = recorded_events()
    events[0]["gpu"] = "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"
    for event in events:
        if event["kind"] == "step":
            event["mem"]["outside"] = int(0.52 * GiB)
    app = DashboardApp(write_recorded_run(tmp_path / "run", events), poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        assert "NVIDIA H100 80GB HBM3" in panel_text(app, TitleBar)
        assert "kernels off" not in panel_text(app, TitleBar)
        assert "context     532.48MiB" in panel_text(app, MemoryPanel)
    events[0]["kernels"] = "no usable NVIDIA driver (CUDA_ERROR_NO_DEVICE)"
    app = DashboardApp(write_recorded_run(tmp_path / "run2", events), poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        assert "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB) · kernels off" in panel_text(app, TitleBar)


@synchronous
async def test_memory_bars_turn_to_the_warning_colour_near_the_budget_and_red_past_it(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        panel = app.query_one(MemoryPanel)
        style = panel.get_component_rich_style
        budget = 24 * GiB
        assert panel._bar(int(0.5 * budget), budget, budget, 20).spans[0].style == style("memory--ok")
        # The recorded peak, 21.9 GiB of 24, is 91%: warning.
        assert panel._bar(int(21.9 * GiB), budget, budget, 20).spans[0].style == style("memory--warn")
        over = panel._bar(int(1.2 * budget), int(1.2 * budget), budget, 20)
        assert over.spans[0].style == style("memory--over")
        assert over.plain.index("┃") == 16             # the budget line sits at 24/28.8 of the bar


@synchronous
async def test_panels_degrade_when_the_plan_has_no_breakdown_and_config_is_missing(tmp_path):
    plan = {k: v for k, v in PLAN.items() if k not in ("breakdown", "vram", "extra")}
    run = write_recorded_run(tmp_path / "run", recorded_events(device="cpu"), config=None, plan=plan)
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        memory = panel_text(app, MemoryPanel)
        assert "budget      none set" in memory and "planned" not in memory
        assert "measured · cpu · step 60" in memory and "rss" in memory and "1.16GiB" in memory
        # A CPU run's peak is its resident set's, the figure its plan predicts.
        assert next(line for line in memory.splitlines() if line.startswith("peak rss")).endswith("1.26GiB")
        assert "on        grad ckpt" in panel_text(app, PlanPanel)


# ---------------------------------------------------------------- keys and the control channel

@synchronous
async def test_p_toggles_pause_and_resume_and_s_asks_for_a_checkpoint(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        assert app.state.status == "running"
        await pilot.press("p")
        assert control_requests(live_run) == ["pause"]
        assert "sent: pause" in panel_text(app, ProgressStrip)
        await pilot.press("p")                     # before any acknowledgement: undo the pause
        await pilot.press("s")
        assert control_requests(live_run) == ["pause", "resume", "save"]


@synchronous
async def test_p_resumes_a_run_the_trainer_reports_paused_and_acks_clear_the_pending_line(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("s")
        save_id = next(iter(app.pending))
        log = EventLog(live_run)
        log.emit("control", request="save", id=save_id, status="done", detail="")
        log.emit("checkpoint", step=25, path="checkpoints/step-25")
        log.emit("paused", step=25)
        log.close()
        await wait_until(pilot, lambda: app.state.paused)
        assert "PAUSED" in panel_text(app, TitleBar)
        assert "sent:" not in panel_text(app, ProgressStrip)
        await pilot.press("p")
        assert control_requests(live_run) == ["save", "resume"]


@pytest.mark.parametrize("key", ["q", "ctrl+c"])
@synchronous
async def test_q_or_ctrl_c_on_a_live_run_asks_and_stop_sends_a_stop_request(live_run, key):
    """Ctrl-C asks what q asks (Textual's own hint pointed at ctrl+q, which detached)."""
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press(key)
        assert type(app.screen).__name__ == "QuitScreen"
        question = str(app.screen.query_one("#quit-question").render())
        assert question.startswith("The run is still training.")
        assert f"reattach with lowmem monitor {live_run}" in question        # the run's own folder
        await pilot.press("escape")                # cancel: still here, nothing sent
        assert type(app.screen).__name__ == "DashboardScreen"
        await pilot.press(key, key)                # asked once, not twice
        assert len(app.screen_stack) == 2
        await pilot.press("s")
    assert app.return_value == "stop"
    assert control_requests(live_run) == ["stop"]


@synchronous
async def test_q_then_detach_leaves_the_trainer_alone(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("q", "d")
    assert app.return_value == "detach"
    assert control_requests(live_run) == []


@synchronous
async def test_the_quit_question_goes_when_the_run_ends_under_it(live_run):
    """It said "still training", and s then wrote a stop to a crashed run and exited 0."""
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("q")
        assert type(app.screen).__name__ == "QuitScreen"
        log = EventLog(live_run)
        log.emit("error", message="RuntimeError: CUDA out of memory")
        log.close()
        await wait_until(pilot, lambda: app.state.over)
        await pilot.pause(0.1)
        assert type(app.screen).__name__ == "DashboardScreen"
        await pilot.press("s", "q")
    assert app.return_value == "closed" and control_requests(live_run) == []


@synchronous
async def test_a_pause_not_yet_acknowledged_counts_when_quitting(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("p", "q")
        assert app.screen.paused                     # offers resume & detach, says it stays paused
        await pilot.press("r")
    assert app.return_value == "detach" and control_requests(live_run) == ["pause", "resume"]


@synchronous
async def test_a_control_file_that_cannot_be_written_is_a_notice_not_a_crash(live_run):
    (live_run / CONTROL_FILE).mkdir()                # as a run this user cannot write
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("s", "p")
        assert not app.pending and app.pause_wanted is None
        await pilot.press("q", "s")                  # the stop cannot be sent: the dashboard stays
        assert type(app.screen).__name__ == "DashboardScreen" and app.return_value is None
        await pilot.press("q", "d")
    assert app.return_value == "detach"
    assert any("cannot ask the trainer to save" in n.message for n in app._notifications)


@synchronous
async def test_the_log_starts_over_with_the_run_and_draws_only_its_newest_lines(tmp_path):
    events = recorded_events(steps=2000)
    first = events[0]["t"]
    many = [events[0]] + [dict(t=first + i, kind="checkpoint", step=i, path=f"checkpoints/step-{i}")
                          for i in range(1, 2001)]
    run = write_recorded_run(tmp_path / "run", many + events[1:])
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        log = app.query_one(EventLogPanel)
        assert log.lines_written <= EventLogPanel.MAX_LINES and len(log.lines) <= EventLogPanel.MAX_LINES * 3
        (run / "events.jsonl").unlink()                  # the run started over
        fresh = EventLog(run)
        fresh.emit("start", run="again", steps=5, pid=os.getpid())
        fresh.close()
        await wait_until(pilot, lambda: log.lines_written == 1)
        assert "checkpoint" not in "".join(line.text for line in log.lines)


@synchronous
async def test_keys_send_nothing_to_a_finished_run_and_q_just_exits(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.press("p", "s", "question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape", "q")
    assert app.return_value == "finished"
    assert not (finished_run / CONTROL_FILE).exists()


# ---------------------------------------------------------------- what a real run throws at it

@synchronous
async def test_before_the_trainer_starts_it_waits_and_sends_nothing(tmp_path):
    run = write_recorded_run(tmp_path / "run", [])
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.state.updates > 0)
        assert "WAITING FOR TRAINER" in panel_text(app, TitleBar)
        assert "waiting for the first step" in screen_text(app)
        await pilot.press("p", "s")
        assert control_requests(run) == []     # the trainer would treat them as history



@synchronous
async def test_a_partial_last_line_waits_for_its_newline(tmp_path):
    run = write_recorded_run(tmp_path / "run", recorded_events(upto=10, finished=False))
    step_11 = json.dumps(recorded_events(upto=11, finished=False)[-1]) + "\n"
    with open(run / EVENTS_FILE, "a") as f:
        f.write(step_11[:40])                       # the trainer is mid-write
    app = DashboardApp(run, poll_s=0.05, check_trainer=False)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.pause(0.2)
        assert app.state.step == 10 and "step 10/60" in panel_text(app, ProgressStrip)
        with open(run / EVENTS_FILE, "a") as f:
            f.write(step_11[40:])
        await wait_until(pilot, lambda: app.state.step == 11)
        assert "step 11/60" in panel_text(app, ProgressStrip)


@synchronous
async def test_a_crashed_trainer_shows_its_error_prominently(tmp_path):
    run = write_recorded_run(tmp_path / "run", recorded_events(crash_at=37, pid=dead_pid()))
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        banner = app.query_one(Banner)
        assert banner.display and banner.region.height >= 1
        assert "The trainer failed at step 37: CUDA out of memory" in panel_text(app, Banner)
        assert "CRASHED" in panel_text(app, TitleBar)
        await pilot.press("q")
    assert app.return_value == "closed"


@synchronous
async def test_a_trainer_gone_without_done_is_called_out(tmp_path):
    run = write_recorded_run(tmp_path / "run", recorded_events(upto=30, finished=False, pid=dead_pid()))
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: app.state.trainer_gone)
        assert "trainer process ended without finishing after step 30" in panel_text(app, Banner)
        assert "TRAINER GONE" in panel_text(app, TitleBar)
        await pilot.press("p")
        assert not (run / CONTROL_FILE).exists()


@synchronous
async def test_events_appended_while_it_runs_update_the_loss_chart_and_labels(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        chart = app.query_one("#loss", LineChart)
        assert chart.point_count == 25 + 1             # 25 steps, 1 eval
        await pilot.press("question_mark")             # updates keep flowing under a dialog
        log = EventLog(live_run)
        for event in recorded_events(upto=30, finished=False, pid=os.getpid())[-5:]:
            log.emit(event.pop("kind"), **event)
        log.close()
        await wait_until(pilot, lambda: app.state.step == 30)
        await pilot.press("escape")
        assert len(chart.series[0].points) == 30
        assert "step 30/60" in panel_text(app, ProgressStrip)
        assert f"train {recorded_loss(30):.4g}" in app.query_one("#loss").border_subtitle


@synchronous
async def test_a_running_evaluation_shows_how_far_it_has_got_until_its_result(live_run):
    from lowmem.tui.describe import plain_line

    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test() as pilot:
        await wait_until(pilot, loaded(app))
        log = EventLog(live_run)
        log.emit("evaluating", step=25, label="periodic", phase="answers", done=40, total=64)
        await wait_until(pilot, lambda: app.state.evaluating is not None)
        assert "evaluating generated 40/64 answers" in panel_text(app, ProgressStrip)
        log.emit("eval", step=25, loss=1.2345, exact_match=0.5, examples=64)
        log.close()
        await wait_until(pilot, lambda: app.state.evaluating is None)
        strip = panel_text(app, ProgressStrip)
        assert "eval 1.234" in strip and "evaluating" not in strip
    event = {"kind": "evaluating", "step": 0, "label": "before", "phase": "loss", "done": 16, "total": 80}
    assert plain_line(event) == "evaluating (before) @ step 0: scored 16/80 examples"
    assert plain_line({**event, "done": 0}) is None          # its start: the dashboard's, not the log's
    assert plain_line({"kind": "eval", "step": 4, "loss": 0.25, "exact_match": 0.625, "examples": 80}) == \
        "eval @ step 4: loss 0.25, exact match 62.5% of 80"


# ---------------------------------------------------------------- sizes

@synchronous
async def test_80x24_keeps_every_essential_figure_and_resizes_both_ways(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, loaded(app))
        assert app.screen.has_class("-compact")
        screen = screen_text(app)
        for expected in ("FINISHED", "step 60/60", "elapsed 3:30", "eta", "loss 1.008", "eval 1.128",
                         "lr 2.00e-05", "qlora · nf4", "r64 · batch 4×8 · seq 2048", "on: grad ckpt",
                         "budget      24.00GiB", "plan total", "18.08GiB", "peak", "21.90GiB",
                         "step 60 ", "done @ step 60", "p Pause/resume", "q Quit", "? Help"):
            assert expected in screen, expected
        assert all(line.rstrip() == line.rstrip()[:80] for line in screen.splitlines())

        await pilot.resize_terminal(120, 40)
        await pilot.pause(0.1)
        assert not app.screen.has_class("-compact") and app.query_one("#lr").display
        assert "activations" in screen_text(app)
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.1)
        assert app.screen.has_class("-compact") and not app.query_one("#lr").display
        assert "plan total" in screen_text(app)


def test_snapshot_of_a_finished_run_at_120x40(snap_compare):
    app = DashboardApp(RECORDED, poll_s=0.05)

    async def loaded_run(pilot):
        await wait_until(pilot, loaded(app))

    assert snap_compare(app, terminal_size=(120, 40), run_before=loaded_run)


def test_the_checked_in_recorded_run_is_what_the_builder_writes(tmp_path):
    fresh = write_recorded_run(tmp_path / "run")
    for name in ("config.yaml", "plan.yaml", EVENTS_FILE):
        assert (RECORDED / name).read_text() == (fresh / name).read_text(), name


# ---------------------------------------------------------------- lowmem monitor

def parse_monitor(*argv: str):
    import argparse

    from lowmem.commands import monitor

    parser = argparse.ArgumentParser(prog="lowmem")
    monitor.register(parser.add_subparsers())
    return parser.parse_args(["monitor", *argv])


def test_monitor_without_a_terminal_prints_progress_lines_and_returns_0_for_a_finished_run(finished_run, capsys):
    args = parse_monitor(str(finished_run), "--no-tui", "--poll", "0.01")
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "started qwen7b-alpaca: Qwen/Qwen2.5-7B · qlora · cuda, 60 steps (pid 4242)"
    assert lines[1].startswith("step  1/60  loss 2.7370  lr 4.00e-05  grad 0.962  26,214 tok/s  peak 19.55GiB  0:00:")
    assert "checkpoint @ step 20: checkpoints/step-20" in lines
    assert lines[-1] == "done @ step 60: finished"


def test_monitor_returns_1_and_prints_the_error_of_a_crashed_run(tmp_path, capsys):
    from lowmem.commands.monitor import print_progress

    run = write_recorded_run(tmp_path / "run", recorded_events(crash_at=5, pid=dead_pid()))
    out = io.StringIO()
    assert print_progress(run, poll_s=0.01, out=out) == 1
    assert out.getvalue().splitlines()[-1] == "error: CUDA out of memory: tried to allocate 2.00 GiB"

    gone = write_recorded_run(tmp_path / "gone", recorded_events(upto=3, finished=False, pid=dead_pid()))
    out = io.StringIO()
    assert print_progress(gone, poll_s=0.01, out=out) == 1
    assert out.getvalue().splitlines()[-1] == "error: trainer process ended without finishing (no `done` event)"


def test_monitor_opens_the_dashboard_only_on_an_interactive_terminal_outside_ci(monkeypatch):
    from lowmem.commands.monitor import use_dashboard

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    assert use_dashboard(False, Tty()) and not use_dashboard(True, Tty())
    assert not use_dashboard(False, io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not use_dashboard(False, Tty())


def test_monitor_refuses_a_directory_that_is_not_a_run(tmp_path):
    args = parse_monitor(str(tmp_path / "missing"))
    with pytest.raises(LowmemError, match="does not exist"):
        args.func(args)


def test_reader_follows_the_run_directory_incrementally(tmp_path):
    run = write_recorded_run(tmp_path / "run", recorded_events(upto=3, finished=False))
    reader = RunReader(run, check_trainer=False)
    first = reader.poll()
    assert [e["kind"] for e in first.events] == ["start", "step", "step", "step"]
    assert first.plan["method"] == "qlora" and first.config["steps"] == 60
    assert not reader.poll()                         # nothing new: an empty update
    (run / "plan.yaml").write_text("method: [unclosed\n")
    os.utime(run / "plan.yaml", (T0, T0))
    assert "plan.yaml could not be read" in reader.poll().problems[0]


# ---------------------------------------------------------------- regenerate the fixture and the docs

def write_docs_screenshots() -> None:
    """`python tests/test_tui.py`: rewrite tests/data/recorded_run and docs/dashboard-*.svg."""
    import shutil

    from textual._doc import take_svg_screenshot

    shutil.rmtree(RECORDED, ignore_errors=True)
    write_recorded_run(RECORDED)
    docs = Path(__file__).parent.parent / "docs"
    for width, height in ((120, 40), (80, 24)):
        app = DashboardApp(RECORDED, poll_s=0.05)

        async def loaded_run(pilot, app=app):
            await wait_until(pilot, loaded(app))

        svg = take_svg_screenshot(app, terminal_size=(width, height), run_before=loaded_run,
                                  title=f"lowmem monitor {RECORDED.relative_to(docs.parent)}")
        (docs / f"dashboard-{width}x{height}.svg").write_text(svg)


if __name__ == "__main__":
    write_docs_screenshots()


@synchronous
async def test_a_live_tiny_cpu_training_run_updates_the_loss_chart(tmp_path, tiny_model_dir, tiny_chat_data):
    """The real trainer, in its own process as `lowmem train` runs it, watched by the dashboard."""
    from lowmem.config import load_config
    from lowmem.planner import plan_from_config
    from lowmem.trainer import new_run_dir, write_run_files

    config = load_config(overrides=[f"model={tiny_model_dir}", f"data={tiny_chat_data}",
                                    f"runs_dir={tmp_path}", "name=live", "steps=6", "micro_batch=2",
                                    "eval_generate=false", "eval_fraction=0.2"])
    run_dir = new_run_dir(config)
    write_run_files(run_dir, config, plan_from_config(config))
    trainer = subprocess.Popen([sys.executable, "-m", "lowmem", "worker", str(run_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        app = DashboardApp(run_dir, poll_s=0.1)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: (app.state.step or 0) >= 3, timeout=120)
            chart = app.query_one("#loss", LineChart)
            assert len(chart.series[0].points) >= 3
            await wait_until(pilot, lambda: app.state.done is not None, timeout=120)
            assert len(chart.series[0].points) == 6
            assert "step 6/6" in panel_text(app, ProgressStrip)
    finally:
        assert trainer.wait(timeout=120) == 0


def test_a_trainer_on_another_host_is_read_not_declared_gone(tmp_path):
    """A run directory on shared storage, trained elsewhere: its pid means nothing on this host, so the
    dashboard follows the events without calling the trainer gone; a local dead pid is still gone."""
    from lowmem.events import this_host

    elsewhere = recorded_events(upto=3, finished=False, pid=dead_pid())
    elsewhere[0]["host"] = this_host() + "-elsewhere"
    reader = RunReader(write_recorded_run(tmp_path / "remote", elsewhere))
    assert len(reader.poll().events) == 4
    assert not reader.poll().trainer_gone and not reader.over
    local = recorded_events(upto=3, finished=False, pid=dead_pid())
    local[0]["host"] = this_host()
    reader = RunReader(write_recorded_run(tmp_path / "local", local))
    assert reader.poll().trainer_gone and reader.over


def test_a_quiet_trainer_on_another_host_is_said_to_be_maybe_gone_until_it_speaks(tmp_path, monkeypatch, capsys):
    """Its pid cannot be checked from here: after QUIET_S without an event (not paused) the
    reader says it may have stopped, once, and takes it back when an event comes."""
    import threading

    import lowmem.tui.reader as reader_module
    from lowmem.commands.monitor import print_progress
    from lowmem.events import this_host
    from lowmem.tui.state import RunState

    def append(run, *events):
        with open(run / EVENTS_FILE, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)

    events = recorded_events(upto=3, finished=False)
    events[0]["host"] = this_host() + "-elsewhere"
    run = write_recorded_run(tmp_path / "remote", events)
    reader, state = RunReader(run), RunState()
    state.apply(reader.poll())
    assert not state.quiet
    monkeypatch.setattr(reader_module, "QUIET_S", 0.0)
    update = reader.poll()
    assert f"from the trainer on {this_host()}-elsewhere" in update.quiet and not update.trainer_gone
    state.apply(update)
    banner = Banner()
    banner.state = state
    assert banner.message.startswith("⚠ no event for over 0 min") and "may have stopped" in banner.message
    assert not reader.poll()                      # said once
    monkeypatch.setattr(reader_module, "QUIET_S", 600.0)
    append(run, dict(t=T0 + 99, kind="step", step=4, steps=60, loss=1.0))
    update = reader.poll()
    assert update.quiet == "" and len(update.events) == 1
    state.apply(update)
    assert state.quiet == "" and banner.message == ""
    append(run, dict(t=T0 + 100, kind="paused", step=4))     # a paused run is quiet on purpose
    reader.poll()
    monkeypatch.setattr(reader_module, "QUIET_S", 0.0)
    assert reader.poll().quiet is None

    # The plain monitor prints it as a warning and goes on following until the run ends.
    run = write_recorded_run(tmp_path / "remote-plain", events)
    ending = threading.Timer(1.0, append, (run, dict(t=T0 + 101, kind="done", step=3, reason="stopped")))
    ending.start()
    assert print_progress(run, poll_s=0.05, out=sys.stdout) == 0
    out = capsys.readouterr().out
    assert out.count("warning: no event for over 0 min from the trainer on") == 1
    assert out.rstrip().endswith("done @ step 3: stopped")


def test_a_run_no_trainer_took_is_declared_gone_after_the_grace_not_followed_forever(tmp_path, monkeypatch):
    """A trainer that died while loading wrote no `start`: with nobody holding the run's lock
    after the start grace, the reader ends; a live holder is waited for."""
    import os

    import lowmem.tui.reader as reader_module
    from lowmem.events import LOCK, this_host

    run = write_recorded_run(tmp_path / "never", [])
    reader = RunReader(run)
    assert not reader.poll().trainer_gone            # within the grace a trainer may still come
    monkeypatch.setattr(reader_module, "START_GRACE_S", 0.0)
    (run / LOCK).write_text(f"pid {os.getpid()} on {this_host()}")
    update = reader.poll()
    assert not update.trainer_gone and not reader.over
    # The wait is said once, naming who holds the run (it was silent, for ever on another host).
    assert update.quiet == (f"no `start` event after 0 s: waiting for the trainer that holds the run "
                            f"(pid {os.getpid()} on {this_host()}) to load and begin")
    (run / LOCK).write_text(f"pid {dead_pid()} on {this_host()}-elsewhere")   # cannot be checked here
    update = reader.poll()
    assert not update.trainer_gone and not reader.over and update.quiet is None
    (run / LOCK).write_text(f"pid {dead_pid()} on {this_host()}")
    assert reader.poll().trainer_gone and reader.over


def test_monitor_refuses_a_poll_interval_that_is_not_positive(tmp_path, capsys):
    from lowmem.cli import main

    run = write_recorded_run(tmp_path / "r")
    for poll in ("-1", "inf", "nan"):
        assert main(["monitor", str(run), "--no-tui", "--poll", poll]) == 2
        assert "--poll: expected a positive number of seconds" in capsys.readouterr().err


# ---------------------------------------------------------------- runs that go wrong

@synchronous
async def test_a_diverged_run_shows_nan_and_the_chart_leaves_those_steps_out(tmp_path):
    events = recorded_events(upto=8, finished=False, pid=dead_pid())
    events[6]["loss"], events[7]["loss"] = float("nan"), float("inf")     # steps 6 and 7
    run = write_recorded_run(tmp_path / "run", events)
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 8)
        assert "loss nan" not in panel_text(app, ProgressStrip)          # step 8 is finite again
        chart = panel_text(app, "#loss")
        assert "step 8" in chart and "nan" not in chart and "inf" not in chart
        log = EventLog(run)
        log.emit("step", step=9, steps=60, loss=float("nan"), lr=1e-4, grad_norm=float("nan"))
        log.close()
        await wait_until(pilot, lambda: app.state.step == 9)
        assert "loss nan" in panel_text(app, ProgressStrip) and "grad nan" in panel_text(app, ProgressStrip)
        assert "step 8" in panel_text(app, "#loss")                       # the last finite step
    assert app.state.loss[6] != app.state.loss[6]                          # kept as nan, not dropped


def test_a_thinned_chart_draws_the_dots_every_point_draws(monkeypatch):
    """A long run's series is cut to a few points per dot column; the picture is the same."""
    import lowmem.tui.chart as chart_module
    from lowmem.tui.chart import LineChart, Series

    points = [(step, 2.0 + math.sin(step / 37.0) + 0.3 * math.sin(step * 1.3)) for step in range(1, 20_001)]
    points[5000] = (5001, float("nan"))                      # a diverged step breaks the line

    from textual.geometry import Size

    monkeypatch.setattr(LineChart, "size", property(lambda self: Size(90, 20)))

    def draw() -> str:
        chart = LineChart()
        chart.series = [Series("train", points)]
        chart.get_component_rich_style = lambda name: ""
        return chart.render().plain

    thinned = draw()
    assert len(chart_module._thin(points, 1, 20_000, 2 * 80)) < 1000
    monkeypatch.setattr(chart_module, "_thin", lambda points, *args: points)
    assert thinned == draw()


def test_a_corrupt_events_line_is_skipped_not_a_crash(tmp_path, capsys):
    """A power loss leaves NUL bytes; a stray JSON value is not an event. Neither stops a reader."""
    from lowmem.commands.monitor import print_progress
    from lowmem.events import read_events

    run = write_recorded_run(tmp_path / "run", recorded_events(upto=3, finished=False))
    good = (run / EVENTS_FILE).read_bytes().splitlines(keepends=True)
    (run / EVENTS_FILE).write_bytes(b"".join(good[:2]) + b"\0" * 4093 + b"\n" + b"[1, 2]\n" + b"".join(good[2:])
                                    + json.dumps(recorded_events()[-1]).encode() + b"\n")
    assert [e["kind"] for e in read_events(run)] == ["start", "step", "step", "step", "done"]
    assert print_progress(run, poll_s=0.01) == 0
    assert "done @ step 60" in capsys.readouterr().out


def test_a_trainer_that_exited_unreaped_does_not_hold_its_run(tmp_path):
    """`lowmem train` reaps its trainer only after the dashboard closes: until then a trainer
    killed while loading is a zombie, which psutil still lists."""
    import time

    from lowmem.events import LOCK, this_host, trainer_may_hold

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while __import__("psutil").Process(proc.pid).status() != "zombie" and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp_path / LOCK).write_text(f"pid {proc.pid} on {this_host()}")
        assert not trainer_may_hold(tmp_path)
        (tmp_path / LOCK).write_text(f"pid {os.getpid()} on {this_host()}")
        assert trainer_may_hold(tmp_path)
    finally:
        proc.wait()


@synchronous
async def test_a_resumed_run_waits_for_its_new_trainer_not_the_old_done(tmp_path):
    """`lowmem train --resume` opens the dashboard on a stopped run: its losses chart, but its
    status and its keys are the new trainer's."""
    import time

    events = recorded_events(upto=25, finished=False, pid=dead_pid())
    events.append(dict(t=events[-1]["t"] + 1, kind="done", step=25, reason="stopped", resume="..."))
    run = write_recorded_run(tmp_path / "run", events)
    launched = time.time()
    app = DashboardApp(run, poll_s=0.05, since=launched)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        await pilot.pause(0.2)
        assert "WAITING FOR TRAINER" in panel_text(app, TitleBar) and not app.state.over
        assert len(app.state.loss) == 25
        await pilot.press("p")
        assert control_requests(run) == []
        await pilot.press("q")
        assert type(app.screen).__name__ == "QuitScreen"
        assert str(app.screen.query_one("#quit-question").render()).startswith(
            "The run is loading: the trainer has not begun.")
        await pilot.press("escape")
        log = EventLog(run)
        log.emit("start", run="qwen7b-alpaca", steps=60, pid=os.getpid(), resumed=True)
        log.close()
        await wait_until(pilot, lambda: app.state.status == "running")
        assert "RUNNING" in panel_text(app, TitleBar)
        await pilot.press("q", "s")
    assert app.return_value == "stop" and control_requests(run) == ["stop"]


@synchronous
async def test_detaching_from_a_paused_run_says_it_stays_paused_and_r_resumes_it(live_run):
    log = EventLog(live_run)
    log.emit("paused", step=25)
    log.close()
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.state.paused)
        await pilot.press("q")
        question = str(app.screen.query_one("#quit-question").render())
        assert "The run is paused" in question and "it stays paused" in question
        await pilot.press("r")
    assert app.return_value == "detach" and control_requests(live_run) == ["resume"]


def test_a_replaced_events_file_is_read_from_its_start(tmp_path):
    """A run resumed before its first checkpoint starts over in a new events.jsonl; a monitor
    that was following it reads the new file, not past its end."""
    from lowmem.tui.state import RunState

    run = write_recorded_run(tmp_path / "run", recorded_events(upto=9, finished=False))
    reader, state = RunReader(run, check_trainer=False), RunState()
    state.apply(reader.poll())
    assert state.step == 9
    (run / EVENTS_FILE).unlink()
    write_recorded_run(run, recorded_events(upto=2, finished=False))
    update = reader.poll()
    assert update.restarted and [e["kind"] for e in update.events] == ["start", "step", "step"]
    state.apply(update)
    assert state.step == 2 and sorted(state.loss) == [1, 2]
    # Rewritten in place (the same inode) and already longer than what was read: its first line,
    # a `start` of another time, tells it apart.
    longer = recorded_events(upto=12, finished=False, t0=T0 + 1000)
    (run / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in longer))
    update = reader.poll()
    assert update.restarted and len(update.events) == len(longer)


def test_a_file_read_well_again_clears_its_warning(tmp_path):
    from lowmem.tui.state import RunState

    run = write_recorded_run(tmp_path / "run", recorded_events(upto=2, finished=False))
    (run / "config.yaml").write_text("")
    reader, state = RunReader(run, check_trainer=False), RunState()
    state.apply(reader.poll())
    assert state.problems == ["config.yaml is not a mapping of key: value"]
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    os.utime(run / "config.yaml", (T0, T0))
    state.apply(reader.poll())
    assert state.problems == [] and state.config["steps"] == 60


def test_a_checkpoint_folder_is_refused_as_a_run_and_points_to_its_run(tmp_path, capsys):
    from lowmem.cli import main

    run = write_recorded_run(tmp_path / "run")
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "manifest.json").write_text("{}")
    assert main(["monitor", "--no-tui", str(run / "checkpoints" / "step-4")]) == 2
    assert f"is a checkpoint, not a run: open its run directory {run.resolve()}" in capsys.readouterr().err


def test_monitor_passes_its_poll_interval_to_the_dashboard(tmp_path, monkeypatch):
    import lowmem.commands.monitor as monitor
    import lowmem.tui

    asked = {}
    monkeypatch.setattr(monitor, "use_dashboard", lambda no_tui: True)
    monkeypatch.setattr(lowmem.tui, "run_dashboard", lambda run_dir, **kw: asked.update(kw) or "finished")
    args = parse_monitor(str(write_recorded_run(tmp_path / "run")), "--poll", "5")
    assert args.func(args) == 0 and asked == {"poll_s": 5.0}


# ---------------------------------------------------------------- what the plan says

@synchronous
async def test_offloaded_bytes_are_a_host_row_and_plan_keys_show(tmp_path):
    """The plan's `host` is pinned CPU memory, not a device term; GaLore's per-layer updates
    and L4Q's group size are shown under the keys the planner writes."""
    plan = dict(PLAN, method="l4q", base_format="bf16", quant_group=64, galore_per_layer=True, extra={},
                breakdown=dict(BREAKDOWN, host=int(4.25 * GiB), temporaries=0))
    run = write_recorded_run(tmp_path / "run", plan=plan)
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test(size=(120, 48)) as pilot:
        await wait_until(pilot, loaded(app))
        memory = panel_text(app, MemoryPanel)
        assert "host pinned 4.25GiB" in memory
        assert "temporaries" not in memory and "activations" in memory     # a term planned at 0 takes no row
        assert not any(line.startswith("host ") and "─" in line or "█" in line and line.startswith("host")
                       for line in memory.splitlines())
        plan_text = panel_text(app, PlanPanel)
        assert "bf16 (group 64)" in plan_text and "per-layer updates" in plan_text


@synchronous
async def test_a_short_memory_panel_drops_rows_in_the_documented_order(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, loaded(app))
        panel = app.query_one(MemoryPanel)
        rows = panel.rows()
        labels = lambda height: [r[1] for r in panel.fit(rows, height)]
        full = [r[1] for r in rows if r[0] != "heading"]
        assert "dev free" in full and "host rss" in full
        # One row short: the headings go, then device free, host RSS and reserved, before any term.
        assert "dev free" not in labels(len(full) - 1) and "activations" in labels(len(full) - 1)
        assert "reserved" not in labels(len(full) - 3) and "activations" in labels(len(full) - 3)
        # Dropping the terms frees seven rows: what went before them comes back while it fits.
        assert labels(8) == ["budget", "plan total", "peak", "allocated", "reserved", "dev free", "host rss"]
        assert labels(5) == ["budget", "plan total", "peak", "allocated", "reserved"]
        assert labels(4) == ["budget", "plan total", "peak", "allocated"]
        assert labels(3) == ["plan total", "peak", "allocated"]
        assert labels(2) == ["plan total", "peak"]


@synchronous
async def test_below_twenty_rows_the_plan_gives_its_rows_to_memory(finished_run):
    app = DashboardApp(finished_run, poll_s=0.05)
    async with app.run_test(size=(80, 16)) as pilot:
        await wait_until(pilot, loaded(app))
        assert not app.query_one(PlanPanel).display
        screen = screen_text(app)
        assert "plan total" in screen and "peak" in screen


@synchronous
async def test_a_one_step_chart_names_that_step(tmp_path):
    run = write_recorded_run(tmp_path / "run", recorded_events(upto=1, finished=False, pid=dead_pid()))
    app = DashboardApp(run, poll_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.state.step == 1)
        chart = panel_text(app, "#loss")
        assert "step 1" in chart and "step 2" not in chart


def test_lines_with_types_no_trainer_writes_are_skipped_and_an_unreadable_log_is_one_line(tmp_path, capsys):
    """`"mem": [1, 2]`, `"eta_s": Infinity` or `"step": "5"` crashed both readers."""
    from lowmem.cli import main
    from lowmem.events import read_jsonl_tail

    good = {"t": 1.0, "kind": "step", "step": 5, "steps": 9, "loss": float("nan"), "eta_s": 3.0, "mem": {"rss": 1}}
    bad = [{**good, "mem": [1, 2]}, {**good, "mem": {"rss": float("nan")}}, {**good, "eta_s": float("inf")},
           {**good, "step": "5"}, {**good, "step": True}, {**good, "loss": "low"}]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [*bad, good]))
    records, _ = read_jsonl_tail(path)
    assert len(records) == 1 and records[0]["step"] == 5          # a nan loss is a diverged step: kept
    from lowmem.events import ControlReader

    (tmp_path / CONTROL_FILE).write_text('{"t": "now", "request": "stop"}\n{"t": 5.0, "request": "save"}\n')
    assert [r["request"] for r in ControlReader(tmp_path, since=1.0).poll()] == ["save"]   # crashed the trainer
    run = write_recorded_run(tmp_path / "r")
    (run / EVENTS_FILE).unlink()
    (run / EVENTS_FILE).mkdir()
    assert main(["monitor", str(run), "--no-tui"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"CheckpointError: cannot read {run / EVENTS_FILE}: ") and err.count("\n") == 1


def test_a_long_log_is_read_a_chunk_at_a_time_and_its_end_waits_for_the_last_chunk(tmp_path, monkeypatch):
    """A long run's events.jsonl is never held whole: the reader takes a chunk per poll, says it
    is behind, and only at the file's end decides that a dead trainer left without `done`."""
    import lowmem.tui.reader as reader_module
    from lowmem.events import iter_events, read_events, read_jsonl_tail
    from lowmem.tui.reader import follow

    events = recorded_events(steps=40, pid=dead_pid())
    run = write_recorded_run(tmp_path / "long", events)
    path = run / EVENTS_FILE
    whole, end = read_jsonl_tail(path)
    part, offset = read_jsonl_tail(path, 0, limit=500)
    assert 0 < len(part) < len(whole) and 0 < offset < end and whole[:len(part)] == part
    # A line longer than the limit is still read whole.
    assert read_jsonl_tail(path, 0, limit=5) == ([whole[0]], len(path.read_bytes().split(b"\n")[0]) + 1)

    monkeypatch.setattr("lowmem.events.READ_CHUNK", 700)
    assert list(iter_events(run)) == whole == read_events(run)
    monkeypatch.setattr(reader_module, "READ_CHUNK", 700)
    reader = RunReader(run)          # its pid is dead: only a reader at the end may say so
    polls = []
    while not reader.over:
        update = reader.poll()
        polls.append((len(update.events), reader.behind, update.trainer_gone))
        assert len(polls) < 100
    assert len(polls) > 3 and all(behind for _, behind, _ in polls[:-1]) and not polls[-1][1]
    assert sum(n for n, _, _ in polls) == len(whole)
    assert not any(gone for _, _, gone in polls) and reader._done   # the `done` was found, not "gone"
    assert sum(len(u.events) for u in follow(run, poll_s=60)) == len(whole)   # no sleep while behind


def test_a_finished_runs_done_line_carries_its_last_words_and_a_stopped_ones_its_resume():
    from lowmem.tui.describe import plain_line

    done = {"kind": "done", "step": 20, "reason": "finished", "resume": None,
            "closing": ["adapter saved to runs/a/adapter (PEFT layout)", "held-out loss 2.7853 -> 0.5716"]}
    assert plain_line(done) == ("done @ step 20: finished; adapter saved to runs/a/adapter (PEFT layout); "
                                "held-out loss 2.7853 -> 0.5716")
    stopped = {**done, "reason": "stopped", "resume": "lowmem train --resume runs/a",
               "closing": ["stopped at step 20/40; checkpoint runs/a/checkpoints/step-20; continue with: ..."]}
    assert plain_line(stopped) == "done @ step 20: stopped; resume with: lowmem train --resume runs/a"
    assert plain_line({k: v for k, v in done.items() if k != "closing"}) == "done @ step 20: finished"


def test_a_damaged_event_log_is_said_to_be(tmp_path):
    """Lines that are not events are skipped and counted; a trainer that ended without `done`
    is explained by the file where it can be: cut short, or not there at all."""
    events = recorded_events(upto=5, finished=False, pid=dead_pid())
    run = write_recorded_run(tmp_path / "run", events)
    with open(run / EVENTS_FILE, "ab") as f:
        f.write(b"not json\n[1, 2, 3]\n\x00\xff\n")
        f.write(b'{"t": 9.0, "kind": "done", "step": 5, "reas')          # the `done` cut short
    reader, problems = RunReader(run), []
    for _ in range(20):                        # read in chunks, to the end
        update = reader.poll()
        problems += update.problems
        if update.trainer_gone:
            break
    assert update.trainer_gone
    assert any(p.startswith(f"{EVENTS_FILE}: 3 lines that are not an event skipped (from byte ") for p in problems)
    assert any(p.startswith(f"{EVENTS_FILE} ends in an incomplete line (") for p in problems)

    empty = write_recorded_run(tmp_path / "gone", [])
    (empty / EVENTS_FILE).unlink()
    (empty / "adapter").mkdir()
    reader = RunReader(empty)
    reader._opened -= 60                       # past the grace a starting trainer gets
    update = reader.poll()
    assert update.trainer_gone and f"there is no {EVENTS_FILE} in {empty}" in " ".join(update.problems)


@synchronous
async def test_a_terminal_too_small_for_the_panels_says_so_and_the_keys_still_work(live_run):
    app = DashboardApp(live_run, poll_s=0.05)
    async with app.run_test(size=(40, 10)) as pilot:
        await wait_until(pilot, loaded(app))
        note = app.screen.query_one("#too-small")
        assert note.display and not app.screen.query_one("#main").display
        assert f"lowmem monitor {live_run} --no-tui" in str(note.render())
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.1)
        assert not note.display and app.screen.query_one("#main").display
        await pilot.resize_terminal(40, 10)
        await pilot.press("p")
        await wait_until(pilot, lambda: control_requests(live_run) == ["pause"])


def test_a_resume_command_names_the_run_as_the_reader_was_given_it(tmp_path, monkeypatch):
    """The trainer wrote `--resume runs/a` from its own folder; read from elsewhere, the command
    names the run so that it works from here."""
    events = recorded_events(upto=3, finished=False, pid=dead_pid())
    events.append(dict(t=events[-1]["t"] + 1, kind="done", step=3, reason="stopped",
                       resume="lowmem train --resume runs/a"))
    run = write_recorded_run(tmp_path / "elsewhere" / "runs" / "a", events)
    monkeypatch.chdir(tmp_path)
    done = [e for e in RunReader(run).poll().events if e["kind"] == "done"]
    assert done[0]["resume"] == f"lowmem train --resume {run}"
    monkeypatch.chdir(tmp_path / "elsewhere")              # where the trainer ran: as it wrote it
    done = [e for e in RunReader(Path("runs/a")).poll().events if e["kind"] == "done"]
    assert done[0]["resume"] == "lowmem train --resume runs/a"
