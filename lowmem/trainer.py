"""The one training loop. The Plan decides; this file only carries it out.

A run, in order: make or reopen the run directory, load the model and apply
the plan's method, read the data, evaluate before, then for each optimizer
step: take `grad_accum` micro-batches, forward (saved activations offloaded
when the plan says so), token-weighted loss (chunked when it says so), backward,
clip, optimizer step at the scheduled lr; log, obey control requests, checkpoint.
A per-layer optimizer (GaLore) updates each weight inside backward instead and
clips per tensor (lowmem/galore.py).
Evaluate after, save the adapter (PEFT layout), write `done`.

Loss of a step = Σ token losses over all its micro-batches / their token
count, so accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import yaml

from lowmem import memstats
from lowmem.checkpoint import (LATEST, RunLock, checkpoint_step, find_resumable, list_checkpoints, load_checkpoint,
                               prune_checkpoints, save_checkpoint, set_aside_damaged, set_rng_state,
                               write_run_file)
from lowmem.config import RunConfig, bad_run_name, format_size
from lowmem.data import BatchStream, decoder_inputs, fingerprint, load_datasets
from lowmem.errors import CheckpointError, ConfigError, DataError, DivergedError, ModelError
from lowmem.evaluate import autocast_for, evaluate
from lowmem.events import (ControlReader, EventLog, clock, evaluation_progress, finished_steps, is_number,
                           read_events, run_dir_hint, step_line, this_host)
from lowmem.loss import causal_lm_loss, count_targets
from lowmem.offload import OffloadActivations
from lowmem.lora import save_adapter
from lowmem.optim import build_optimizer, load_optimizer_state
from lowmem.loram import load_streamed_loram
from lowmem.loram import streams as loram_streams
from lowmem.model import (dense_weight_dtype, load_model, load_tokenizer, parameter_count, prepare_for_training,
                          resolve_model_dir, trainable_parameters)
from lowmem.planner import Plan

# Keys a resumed run may change: they decide when to log, save and evaluate, not what is
# computed, so the steps already planned keep their losses. `steps` is the exception that
# lengthens the run: the learning-rate schedule then spans the new length from the step
# resumed at (cosine and linear decay are stretched; warm-up is unchanged).
# Steps in a row whose loss or gradient is not finite before a run stops as diverged. One such
# step (a pathological batch) is skipped: its update is not applied, the weights stay finite.
MAX_SKIPPED_STEPS = 3

RESUMABLE_CHANGES = {"steps", "eval_every", "eval_max_examples", "eval_generate", "max_new_tokens",
                     "save_every", "save_minutes", "keep_checkpoints", "log_every"}


def lr_at(step: int, config: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio·lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * shape)


def new_run_dir(config: RunConfig) -> Path:
    """A new, empty run directory. One that exists is refused (resume it), unless it holds
    nothing trained: no checkpoint and no final weights, as a run stopped or failed before
    its first checkpoint leaves it. That one is emptied and used again, unless a trainer
    is working in it."""
    name = config.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    if bad_run_name(name):
        raise ConfigError(f"key 'name': {bad_run_name(name)}")
    run_dir = Path(config.runs_dir) / name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run directory; choose another --name or --runs-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not holds_nothing_trained(run_dir):
            raise ConfigError(f"run directory {run_dir} already exists; resume it with "
                              f"`{train_command(f'--resume {run_dir}')}` or choose another --name")
        with RunLock(run_dir, holder=False):
            for entry in run_dir.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        print(f"reusing {run_dir}: it holds no checkpoint (its last start ended before one was written)",
              file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the run directory {run_dir} (runs_dir={config.runs_dir}): "
                          f"{e.strerror or e}") from None
    return run_dir


# What a run directory holds before its first checkpoint: files lowmem writes, nothing else.
_EARLY_RUN_FILES = {"config.yaml", "plan.yaml", "events.jsonl", "control", "trainer.log", ".lock",
                    "loram_index.json", "loram_aligned.safetensors"}


def holds_nothing_trained(run_dir: Path) -> bool:
    """Whether `run_dir` is a run directory (config.yaml) that holds only what lowmem writes
    before a first checkpoint: no checkpoint, no final weights, and nothing of anyone else's.
    Only such a directory may be emptied for a new run."""
    if not (run_dir / "config.yaml").is_file():
        return False
    for entry in run_dir.iterdir():
        if entry.name == "checkpoints" and entry.is_dir():
            # Half-done writes and a pointer to nothing are not trained weights.
            if any(not p.name.startswith((".tmp-step-", LATEST, f".{LATEST}")) for p in entry.iterdir()):
                return False
        elif entry.name not in _EARLY_RUN_FILES:
            return False
    return True


def write_run_files(run_dir: Path, config: RunConfig, plan: Plan) -> None:
    write_run_file(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_run_file(run_dir / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))


HELDOUT_CHANGED = "the held-out data changed since the checkpoint was made"

#: A resume's config (`lowmem train --resume RUN steps=N`), kept beside config.yaml until the
#: trainer has taken the resume on (model, data and checkpoint loaded): it then becomes
#: config.yaml, and a resume refused before that leaves config.yaml as it was.
PENDING_CONFIG = "resume.yaml"


def read_run_files(run_dir: Path, resume: bool = False) -> tuple[RunConfig, Plan]:
    """The config and plan a run directory was started (or last resumed) with, or with `resume`
    the config a resume asked for (PENDING_CONFIG) where there is one; CheckpointError
    naming plan.yaml when it is missing or damaged (each checkpoint keeps a copy)."""
    path = Path(run_dir) / "plan.yaml"
    pending = resume and (Path(run_dir) / PENDING_CONFIG).is_file()
    config = resumed_config(run_dir, {}, PENDING_CONFIG if pending else "config.yaml")
    try:
        plan = Plan.from_dict(yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's plan ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'empty'}){_copy_hint(run_dir, 'plan.yaml')}"
                              ) from None
    return config, plan


def _copy_hint(run_dir: Path, name: str, unless: str | None = None) -> str:
    """Where the newest checkpoint keeps a copy of the run's `name`; nothing when it has none,
    or when the copy's text is `unless` (the file as it is: copying would not help)."""
    copies = [c / name for c in list_checkpoints(run_dir) if (c / name).is_file()]
    if not copies:
        return ""
    if unless is not None:
        try:
            if copies[-1].read_text() == unless:
                return ""
        except (OSError, UnicodeDecodeError):
            return ""
    return f"; the newest checkpoint keeps a copy: cp {copies[-1]} {Path(run_dir) / name}"


def resumed_config(run_dir: Path, requested: dict, name: str = "config.yaml") -> RunConfig:
    """The run's own config (`name`), with the few keys a resume may change applied on top."""
    from lowmem.config import read_yaml_layer, build_config

    path = Path(run_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml){run_dir_hint(run_dir)}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}){_copy_hint(run_dir, 'config.yaml')}") from None
    if not text.strip():
        raise CheckpointError(f"{path} is empty{_copy_hint(run_dir, 'config.yaml')}")
    try:
        base_values, origins = read_yaml_layer(text, str(path))
        base = build_config([(base_values, origins)], resuming=True)
    except ConfigError as e:      # the run's own file, edited or damaged
        raise ConfigError(f"{e}{_copy_hint(run_dir, 'config.yaml', unless=text)}") from None
    resumed = build_config([(base_values, origins), (requested, {k: "resume: " for k in requested})],
                           resuming=True)
    for key in requested:   # compared as parsed: `--seed 0` is the string "0" until then
        if key in ("runs_dir", "name") and _value(resumed, key) != _value(base, key):
            raise ConfigError(f"'{key}' chooses where a new run goes; a resumed run stays in {run_dir} "
                              f"(a moved run directory resumes where it is): drop it")
        if key not in RESUMABLE_CHANGES and _value(resumed, key) != _value(base, key):
            raise ConfigError(f"cannot change '{key}' when resuming {run_dir}: the run would not "
                              f"continue exactly; keys you may change: {', '.join(sorted(RESUMABLE_CHANGES))}")
    return resumed


def set_aside_final_weights(run_dir: Path, step: int) -> list[str]:
    """A finished run trained further: its final adapter/ or model/ (of the step where it last
    finished, from events.jsonl, else `step`) is renamed <name>-step-<step>, kept but out of
    the way, so that nothing (generate, export) takes it for the run's newest weights while
    the run goes on. Returns what was moved."""
    if any((run_dir / name).is_dir() for name in ("adapter", "model")):
        # Not the checkpoint's step: a resume from an earlier one (the last was damaged).
        step = next(reversed(finished_steps(run_dir)), step)
    moved = []
    for name in ("adapter", "model"):
        final = run_dir / name
        if not final.is_dir():
            continue
        aside, n = run_dir / f"{name}-step-{step}", 1
        while aside.exists():
            n += 1
            aside = run_dir / f"{name}-step-{step}.{n}"
        final.rename(aside)
        moved.append(f"{name}/ from the end at step {step} is kept as {aside.name}; until the run "
                     f"finishes again, its newest checkpoint holds its newest weights")
    return moved


def _value(config: RunConfig, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (kill, `timeout`, a scheduler) stops the trainer as Ctrl-C does wherever the step
    loop's StopRequest is not listening: while the model loads, in an evaluation, at the end."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:      # not the main thread (a test runner's)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """Set by SIGINT/SIGTERM: the current step finishes, then a checkpoint is written."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"{self.signal}: stopping once this step ends, then writing a checkpoint "
              f"(again to stop at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    """Throughput and ETA from the steps taken in this process. Time spent `aside` (paused,
    evaluating, writing checkpoints) counts in the elapsed time but not in the rate. The
    elapsed time goes on from `earlier`, the run's elapsed time at the checkpoint resumed from."""

    total_steps: int
    start_step: int
    earlier: float = 0.0
    started: float = field(default_factory=lambda: time.perf_counter())
    tokens: int = 0
    idle: float = 0.0

    def elapsed(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    @contextlib.contextmanager
    def aside(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.idle += time.perf_counter() - began

    def fields(self, step: int) -> dict:
        """A `step` event's timing fields: tokens, tokens_per_s, elapsed_s, eta_s."""
        elapsed = self.elapsed()
        training = max(time.perf_counter() - self.started - self.idle, 1e-9)
        done = step - self.start_step
        tok_s = self.tokens / training
        eta = training / done * (self.total_steps - step) if done else 0.0
        return {"tokens": self.tokens, "tokens_per_s": round(tok_s, 1),
                "elapsed_s": round(elapsed, 2), "eta_s": round(eta, 1)}


#: Seconds between reports of how far an evaluation has got (a line, and an `evaluating` event).
EVAL_REPORT_S = 20.0

#: Fewer held-out examples than this and a run's evaluations are said to be noise.
FEW_HELDOUT = 20


def _examples(n: int, kind: str) -> str:
    return f"{n} {kind} example{'' if n == 1 else 's'}"


def train_command(arguments: str) -> str:
    """`lowmem train ARGUMENTS` as the user can type it: `./setup.sh demo` sets LOWMEM_TRAIN to
    itself, since its `lowmem` is on no PATH outside it."""
    return f"{os.environ.get('LOWMEM_TRAIN') or 'lowmem train'} {arguments}"


def _seconds(value) -> float:
    """A checkpoint's elapsed_s, or 0 where it has none (or not a time)."""
    return float(value) if is_number(value) and math.isfinite(value) and value >= 0 else 0.0


def train(config: RunConfig, plan: Plan, run_dir: Path, *, resume: bool = False, out=print,
          since: float | None = None) -> dict:
    """Run (or continue) training in `run_dir`; returns the `done` event.

    Control requests stamped at or after `since` (default: now) are for this trainer; the
    dashboard passes the time it started the trainer's process.

    Any failure is written to events.jsonl as an `error` event before it
    propagates, so a dashboard shows why the run ended.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    with RunLock(run_dir, reenter=True), _terminate_as_interrupt():   # `lowmem train` may hold it since its checks
        events = EventLog(run_dir)
        try:
            try:
                return _train(config, plan, run_dir, events, resume, out, since)
            except torch.cuda.OutOfMemoryError as e:   # loading, an evaluation, a step
                raise out_of_memory(e, plan, run_dir) from None
        except BaseException as e:
            # A resume refused (or stopped) before it was taken on leaves config.yaml as it was.
            asked = pending_changes(run_dir)
            (run_dir / PENDING_CONFIG).unlink(missing_ok=True)
            if not isinstance(e, KeyboardInterrupt):
                events.emit("error", message=f"{type(e).__name__}: {e}")
            else:
                # Stopped outside the loop (loading, an evaluation): say so, and tell readers the
                # trainer is over, as the loop's own interruption does.
                saved = list_checkpoints(run_dir)
                resume_cmd = train_command(f"--resume {run_dir}{asked}")
                if saved:
                    out(f"interrupted: `{resume_cmd}` continues from its newest checkpoint")
                else:
                    out(f"interrupted before a checkpoint was written: `{resume_cmd}` starts it over")
                events.emit("done", step=checkpoint_step(saved[-1]) if saved else 0, reason="interrupted",
                            resume=resume_cmd)
            raise
        finally:
            events.close()


def pending_changes(run_dir: Path) -> str:
    """" steps=200 ...": what a resume not yet taken on asked for beyond config.yaml, as the
    key=value arguments that ask for it again; "" when there is none."""
    try:
        pending = yaml.safe_load((run_dir / PENDING_CONFIG).read_text())
        current = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    if not isinstance(pending, dict) or not isinstance(current, dict):
        return ""
    return "".join(f" {key}={yaml.safe_dump(pending[key]).splitlines()[0]}" for key in sorted(RESUMABLE_CHANGES)
                   if key in pending and pending[key] != current.get(key))


def _train(config: RunConfig, plan: Plan, run_dir: Path, events: EventLog, resume: bool, out,
           since: float | None) -> dict:
    # Control requests from now on (or `since`) are for this trainer, even those sent while the
    # model loads (a dashboard's stop), before the channel is opened below.
    began = time.time() if since is None else since
    device = plan.device
    torch.manual_seed(config.seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    checkpoint, damaged = None, []
    if resume:
        folder = find_resumable(run_dir, warn=damaged.append)
        checkpoint = load_checkpoint(folder)
        out(f"resuming {run_dir} from {folder.name}")
        for aside in set_aside_damaged(run_dir, folder):
            damaged.append(f"the damaged checkpoint is kept as {aside}, out of the way of new ones")
    for problem in damaged:
        out(f"warning: {problem}")
        events.emit("warning", message=problem)

    weight_dtype = dense_weight_dtype(plan)
    nf4_targets = plan.nf4_targets
    loram = plan.method == "loram"
    prep = None
    if loram and not resume:
        config, prep = loram_preparation(config, plan, out)
    streamed = loram and loram_streams(config, resume)
    if streamed:
        # Pruned while the weights load, one dense block at a time, then NF4; a new taylor
        # run first scores on calibration batches, so the data comes before the model.
        model_dir = resolve_model_dir(config.model, log=out)
        tokenizer = load_tokenizer(model_dir)
        data = load_datasets(config, tokenizer)
        model = load_streamed_loram(model_dir, plan, config, device, weight_dtype, run_dir, resume,
                                    train_examples=data.train, pad_id=tokenizer.pad_token_id,
                                    score_on=prep.where if prep else None, log=out)
    else:
        # LoRAM prunes float weights, so its base is quantized (QLoRAM) only after pruning,
        # and where the dense model does not fit the GPU it is pruned on the host first.
        prepare_on = prep.where if loram else device   # a LoRAM run that does not stream is a new one
        model, tokenizer, model_dir = load_model(config.model, prepare_on, weight_dtype, log=out,
                                                 nf4_targets=() if loram else nf4_targets,
                                                 double_quant=plan.double_quant)
        data = load_datasets(config, tokenizer)
    notes = []
    if data.truncated:
        notes.append(f"{data.truncated} {'example was' if data.truncated == 1 else 'examples were'} longer than "
                     f"seq_len={config.seq_len} and cut to it")
    for count, which in ((data.dropped, "training"), (data.heldout_dropped, "held-out")):
        if count:
            notes.append(f"{_examples(count, which)} {'was' if count == 1 else 'were'} left out: at "
                         f"seq_len={config.seq_len} the prompt leaves no answer token to learn from (raise "
                         f"seq_len to keep {'it' if count == 1 else 'them'})")
    if config.eval_data and config.data != "embedded" and (
            Path(config.eval_data).expanduser().resolve() == Path(config.data).expanduser().resolve()):
        notes.append("the held-out data is the training data (--eval-data names the --data file): its loss and "
                     "exact match say how well the run memorized, not how it does on examples it has not seen")
    if not getattr(tokenizer, "chat_template", None) and any(e.prompt is not None for e in data.train):
        notes.append("the model has no chat template, so conversations are laid out as '### User:' and "
                     "'### Assistant:' turns; `lowmem generate` prompts the tuned model the same way")
    for message in notes:
        out(f"warning: {message}")
        events.emit("warning", message=message)
    if loram and not streamed:
        from lowmem.loram import prepare_loram_run

        prepare_loram_run(model, plan, config, data.train, tokenizer.pad_token_id, run_dir, log=out)
        if nf4_targets:
            from lowmem.quant.nf4 import quantize_linears

            # One linear at a time onto the device, quantized there.
            quantize_linears(model, nf4_targets, weight_dtype, double_quant=plan.double_quant, device=device)
        model.to(device)
    adapted = prepare_for_training(model, plan)
    params = trainable_parameters(model)
    n_trainable = sum(p.numel() for _, p in params)
    n_total = parameter_count(model)
    stream = BatchStream(data.train, plan.micro_batch, config.seed, tokenizer.pad_token_id)
    heldout_print = fingerprint(data.heldout)

    optimizer = build_optimizer(params, plan, config)
    offload = OffloadActivations(device=device) if plan.offload_activations else None

    step, earlier = 0, 0.0
    skipped = 0   # non-finite steps in a row, up to `step`
    if checkpoint is not None:
        named = dict(params)
        missing = set(named) - set(checkpoint["trainable"])
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, tensor in checkpoint["trainable"].items():
                named[name].copy_(tensor)
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        try:
            stream.load_state_dict(checkpoint["state"]["data"])
        except DataError as e:
            raise DataError(f"--data {config.data}: {e}") from None
        if checkpoint["state"].get("heldout", heldout_print) != heldout_print:   # older checkpoints: not kept
            message = (f"{HELDOUT_CHANGED}: evaluations from here on are not comparable with the "
                       f"earlier ones")
            out(f"warning: {message}")
            events.emit("warning", message=message)
        step = checkpoint["state"]["step"]
        skipped = int(checkpoint["state"].get("skipped", 0))   # older checkpoints: not kept
        earlier = _seconds(checkpoint["state"].get("elapsed_s"))   # older checkpoints: not kept
        set_rng_state(checkpoint["rng"])
        prune_checkpoints(run_dir, config.keep_checkpoints, folder)   # what kills left behind
        if step < config.steps:
            for message in set_aside_final_weights(run_dir, step):
                out(f"note: {message}")
                events.emit("warning", message=message)

    if resume and (run_dir / PENDING_CONFIG).is_file():
        # Taken on: the config this resume trains by (what it asked for, steps=N) is the run's from here.
        write_run_file(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        (run_dir / PENDING_CONFIG).unlink()

    # Opened before `start` is written. Requests from before `began` are history; later ones
    # count, though they came while the model loaded (a dashboard's stop).
    control = ControlReader(run_dir, since=began)
    gpu = memstats.gpu_facts(device)
    events.emit("start", run=run_dir.name, model=config.model, method=plan.method, device=device,
                steps=config.steps, start_step=step, seq_len=config.seq_len,
                tokens_per_step=plan.tokens_per_step, trainable_params=n_trainable,
                total_params=n_total, train_examples=len(data.train),
                heldout_examples=len(data.heldout), pid=os.getpid(), host=this_host(), resumed=resume,
                **gpu)
    # With adapters, the model's own parameters (as `lowmem plan` counts them) and the adapters'.
    sizes = (f"{(n_total - n_trainable) / 1e6:.1f}M parameters + {n_trainable / 1e6:.2f}M trainable in adapters"
             if adapted else f"{n_total / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trainable")
    out(f"{config.model}: {sizes} "
        f"({plan.method}{f', rank {plan.lora_rank}' if plan.lora_rank else ''}) on "
        f"{gpu.get('gpu', device)}"
        f"{'' if gpu.get('kernels', 'on') == 'on' else ' (lowmem.kernels off: ' + gpu['kernels'] + ')'}; "
        f"{len(data.train)} training and {_examples(len(data.heldout), 'held-out')}")
    if not resume:
        # What the plan warned of (keys another method reads, seq_len past the context), said
        # where the run is watched: the dashboard's event log, the console.
        for note in (r for r in plan.reasons if r.startswith("warning: ")):
            out(note)
            events.emit("warning", message=note.removeprefix("warning: "))

    if not data.heldout:
        held = (f"{config.eval_data} gives" if config.eval_data else
                "eval_fraction=0 holds" if config.eval_fraction == 0 else
                f"eval_fraction={config.eval_fraction:g} of this data is under one record, so it holds")
        message = (f"no held-out examples: {held} none out, and evaluation is skipped "
                   f"(give --eval-data, or a larger eval_fraction)")
        out(f"warning: {message}")
        events.emit("warning", message=message)
    elif len(data.heldout) < FEW_HELDOUT and len(data.heldout) != config.eval_max_examples:
        # (Fewer because eval_max_examples asks for fewer, as the smoke preset does, is a choice.)
        message = (f"only {_examples(len(data.heldout), 'held-out')}: its loss and exact match move by "
                   f"chance; {FEW_HELDOUT} or more (--eval-data, or a larger eval_fraction) measure the run")
        out(f"warning: {message}")
        events.emit("warning", message=message)

    def run_eval(label: str) -> dict | None:
        if not data.heldout:
            return None
        began = last = time.monotonic()
        events.emit("evaluating", step=step, label=label, phase="loss", done=0, total=len(data.heldout))

        def report(phase: str, done: int, total: int) -> None:
            # A long evaluation (a large held-out set, answers generated on a CPU) says how far
            # it has got, so that neither the console nor the dashboard looks stuck.
            nonlocal last
            now = time.monotonic()
            if now - last < EVAL_REPORT_S or done == total:    # a phase's end: its next says more
                return
            last = now
            fields = dict(phase=phase, done=done, total=total)
            out(f"eval ({label}, step {step}): {evaluation_progress(fields)} ({clock(now - began)})")
            events.emit("evaluating", step=step, label=label, **fields)

        result = evaluate(model, tokenizer, data.heldout, device, generate_answers=config.eval_generate,
                          max_new_tokens=config.max_new_tokens, progress=report)
        em = result["exact_match"]
        out(f"eval ({label}, step {step}): held-out loss {result['loss']:.4f}"
            + (f", exact match {em:.1%} of {result['examples']}" if em is not None else ""))
        events.emit("eval", step=step, label=label, **result)
        return result

    # The newest checkpoint's step and folder: asked again at the same step (a stop right after a
    # scheduled save, `s` at the end, the end of a run resumed from its last step) it is that one,
    # not a second write that would first have to delete it.
    saved = {"step": step, "folder": folder} if checkpoint is not None else {"step": None}
    saved["at"] = time.monotonic()     # when the newest checkpoint was written, or training began

    def checkpoint_now() -> Path:
        if saved["step"] == step:
            return saved["folder"]
        folder = save_checkpoint(
            run_dir, step, trainable={n: p for n, p in params}, optimizer=optimizer.state_dict(),
            state={"data": stream.state_dict(), "heldout": heldout_print,
                   "elapsed_s": round(progress.elapsed(), 2), "skipped": skipped},
            config=config.to_dict(), plan=plan.to_dict(),
            keep=config.keep_checkpoints,
            extra_dirs={"adapter": lambda d: save_adapter_for(model, plan, config, d, model_dir)} if adapted else None)
        events.emit("checkpoint", step=step, path=str(folder.relative_to(run_dir)))   # however the run was named
        saved.update(step=step, folder=folder, at=time.monotonic())
        return folder

    # Elapsed counts the first evaluation (minutes for a large held-out set); the rate does not.
    progress = Progress(config.steps, step, earlier)
    with progress.aside():
        before = run_eval("before") if not resume else None
    reason = "finished"
    model.train()
    with StopRequest() as stop:
        while step < config.steps:
            try:
                loss, grad_norm, tokens = train_step(model, optimizer, stream, plan, config, lr_at(step, config),
                                                     offload=offload)
            except torch.cuda.OutOfMemoryError as e:
                raise out_of_memory(e, plan, run_dir, f" at step {step + 1}") from None
            step += 1
            skipped = skipped + 1 if not (math.isfinite(loss) and math.isfinite(grad_norm)) else 0
            progress.tokens += tokens
            event = events.emit("step", step=step, steps=config.steps, loss=loss, lr=lr_at(step - 1, config),
                                grad_norm=grad_norm, mem=memstats.measure(device), **progress.fields(step))
            if step % config.log_every == 0 or step == config.steps or skipped:
                out(step_line(event))
            if skipped:
                diverged(step, loss, grad_norm, skipped, getattr(optimizer, "per_layer", False), config,
                         saved["folder"] if saved["step"] is not None else None, events, out)
            with progress.aside():
                if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                    run_eval("periodic")
                if step < config.steps and (
                        (config.save_every and step % config.save_every == 0)
                        or (config.save_minutes and time.monotonic() - saved["at"] >= 60 * config.save_minutes)):
                    checkpoint_now()
                reason = obey_control(control, events, checkpoint_now, step, stop, out) or reason
            if stop.signal:
                reason = "interrupted" if reason == "finished" else reason
                break
            if reason == "stopped":
                break
        # Under the same handlers: a Ctrl-C while the last checkpoint is written (with
        # save_every=0 the only one) waits for it rather than losing the run.
        folder = checkpoint_now()
        if stop.signal and reason == "finished":
            reason = "interrupted"
    if reason == "stopped" and step >= config.steps:
        reason = "finished"     # a stop during the last step: every step is done, the end follows
    resume_cmd = None
    closing: list[str] = []     # the run's last words, kept in its `done` event for a dashboard's console

    def say(message: str) -> None:
        closing.append(message)
        out(message)

    if step < config.steps or reason == "interrupted":
        resume_cmd = train_command(f"--resume {run_dir}")
        say(f"{'stopped' if reason == 'stopped' else 'interrupted'} at step {step}/{config.steps}; "
            f"checkpoint {folder}; continue with: {resume_cmd}")
    else:
        after = run_eval("after")
        if adapted:
            write_final(run_dir, "adapter", lambda d: save_adapter_for(model, plan, config, d, model_dir), folder)
            if plan.method == "l4q":
                say(f"L4Q state saved to {run_dir / 'adapter'}; write the low-bit model with: "
                    f"lowmem export {run_dir} --quantized OUT")
            elif plan.method == "loram":
                say(f"adapter saved to {run_dir / 'adapter'} (PEFT layout), recovered to the full model's shapes: "
                    f"lowmem generate --adapter {run_dir} answers with the full model")
            else:
                say(f"adapter saved to {run_dir / 'adapter'} (PEFT layout)")
        else:
            model.config.use_cache = True   # switched off for training; the saved model generates
            write_final(run_dir, "model", lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)), folder)
            say(f"model saved to {run_dir / 'model'}")
        if before is None and after is not None:   # resumed: the run's first evaluation, from its log,
            logged = read_events(run_dir)             # unless a resume changed the held-out data since
            if not any(e.get("kind") == "warning" and str(e.get("message")).startswith(HELDOUT_CHANGED)
                       for e in logged):
                before = next((e for e in logged if e.get("kind") == "eval" and e.get("label") == "before"), None)
        if before is not None and after is not None:
            summary = f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}"
            if after["exact_match"] is not None and before.get("exact_match") is not None:
                summary += f", exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}"
            if plan.method == "loram":
                summary += " (the pruned model the run trained; the full one with the recovered adapter is not evaluated)"
            say(summary)
    done = events.emit("done", step=step, reason=reason, resume=resume_cmd,
                       peak_rss=memstats.measure(device)["peak_rss"], closing=closing)
    out(run_dir_line(run_dir, done["peak_rss"]))
    return done


def run_dir_line(run_dir: Path, peak_rss) -> str:
    """A run's last console line, from the trainer or, behind the dashboard, `lowmem train`."""
    return f"run directory: {run_dir}" + (f"  (peak memory {format_size(peak_rss)} RSS)" if is_number(peak_rss) else "")


def loram_preparation(config: RunConfig, plan: Plan, out=print):
    """(config with loram.criterion resolved, lowmem.loram.Preparation) for a new LoRAM run; a
    ModelError before anything loads when the preparation fits neither the GPU budget nor this
    machine's RAM. The run directory keeps the config as given; the index map records the
    criterion used."""
    import dataclasses

    import psutil

    from lowmem.loram import preparation
    from lowmem.spec import spec_for

    host = psutil.virtual_memory().available
    prep = preparation(config, plan, spec_for(config.model), host)
    if config.loram.criterion == "auto":
        out(f"LoRAM: pruning by {prep.criterion} ({prep.chosen})")
    if prep.where is None:
        alternative = prep.alternative()
        raise ModelError(f"LoRAM prunes {config.model} from its dense weights before training: "
                         f"{prep.shortfall(plan)}" + (f"; {alternative}" if alternative else ""))
    if prep.where == "cpu" and plan.device == "cuda":
        then = ("then loading the pruned weights onto the GPU" if prep.streamed
                else "then moving the pruned model to the GPU")
        out(f"LoRAM: {prep.what} need {format_size(prep.bytes)}, more than the GPU budget; "
            f"{'scoring' if prep.streamed else 'pruning'} on the host ({format_size(host)} RAM available), {then}")
    return dataclasses.replace(config, loram=dataclasses.replace(config.loram, criterion=prep.criterion)), prep


def train_step(model, optimizer, stream: BatchStream, plan: Plan, config: RunConfig, lr: float,
               offload: OffloadActivations | None = None) -> tuple[float, float, int]:
    """One optimizer step over `plan.grad_accum` micro-batches; returns (loss, grad norm, tokens).

    The model gets `decoder_inputs` (no attention mask but for packed batches).
    A `per_layer` optimizer (GaLore) applies each tensor's update inside
    backward, on the last micro-batch, and clips per tensor; the lr is set
    before backward for it. Others step after backward, clipped globally, and
    not at all when the loss or the gradient norm is not finite.
    """
    device = plan.device
    batches = [stream.next() for _ in range(plan.grad_accum)]
    targets = sum(count_targets(b["labels"]) for b in batches)
    per_layer = getattr(optimizer, "per_layer", False)
    for group in optimizer.param_groups:
        group["lr"] = lr  # before backward: a per-layer optimizer steps inside it
    total_loss, tokens = 0.0, 0
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        if per_layer:
            optimizer.begin_micro_batch(i, len(batches))
        with autocast_for(device):
            with offload if offload is not None else contextlib.nullcontext():
                hidden = decoder(**decoder_inputs(batch)).last_hidden_state
            loss = causal_lm_loss(hidden, head.weight, batch["labels"], reduction="sum",
                                  chunk_size=plan.loss_chunk) / max(targets, 1)
        loss.backward()
        total_loss += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    if per_layer:
        optimizer.step()  # applies what the hooks left pending
        grad_norm = optimizer.grad_norm
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(total_loss) and math.isfinite(grad_norm):
            optimizer.step()
        # else no update: nan or inf would reach every weight and moment (the loop says so)
    optimizer.zero_grad(set_to_none=True)
    return total_loss, grad_norm, tokens


def diverged(step: int, loss: float, grad_norm: float, in_a_row: int, per_layer: bool, config: RunConfig,
             last_checkpoint: Path | None, events: EventLog, out) -> None:
    """A step whose loss or gradient norm is nan or inf: warn that its update was skipped, or
    raise DivergedError when the weights took it (per-layer updates apply in backward) or when
    MAX_SKIPPED_STEPS came in a row. Nothing after the divergence is saved."""
    what = f"step {step}: loss {loss:g}, gradient norm {grad_norm:g}"
    if not per_layer and in_a_row < MAX_SKIPPED_STEPS:
        message = f"{what}: not finite, so its update was skipped (the weights are unchanged)"
        out(f"warning: {message}")
        events.emit("warning", message=message)
        return
    why = ("the per-layer updates applied it in backward" if per_layer
           else f"{in_a_row} steps in a row were not finite")
    kept = (f"the newest checkpoint, {last_checkpoint.name}, is from before it and is kept"
            if last_checkpoint is not None else "no checkpoint was written before it")
    remedies = [f"a lower lr (this one: {config.lr:g})"]
    if not config.warmup_steps:
        remedies.append(f"a warmup (warmup_steps={max(1, min(20, config.steps // 10))})")
    if not config.max_grad_norm:
        remedies.append("clipping (max_grad_norm=1)")
    raise DivergedError(f"{what}: training diverged ({why}); nothing after it is saved and {kept}. "
                        f"Start a new run with {' or '.join(remedies)}")


def obey_control(control: ControlReader, events: EventLog, checkpoint_now, step: int,
                 stop: StopRequest, out) -> str | None:
    """Carry out pause/resume/save/stop requests; returns "stopped" when asked to stop."""
    paused = False
    while True:
        for request in control.poll():
            kind = request["request"]
            if kind == "save":
                folder = checkpoint_now()
                events.emit("control", request=kind, id=request.get("id"), status="done", detail=str(folder))
            elif kind == "pause" and not paused:
                paused = True
                events.emit("control", request=kind, id=request.get("id"), status="done")
                events.emit("paused", step=step)
                out(f"paused at step {step} (resume from the dashboard, or send 'resume')")
            elif kind == "resume" and paused:
                paused = False
                events.emit("control", request=kind, id=request.get("id"), status="done")
                events.emit("resumed", step=step)
                out("resumed")
            elif kind == "stop":
                events.emit("control", request=kind, id=request.get("id"), status="done")
                return "stopped"
            else:
                events.emit("control", request=kind, id=request.get("id"), status="ignored",
                            detail="already " + ("paused" if paused else "running"))
        if not paused or stop.signal:
            return None
        time.sleep(0.2)


def out_of_memory(error: BaseException, plan: Plan, run_dir: Path, when: str = "") -> "BudgetError":
    """A BudgetError for an allocation the device refused (`when`: " at step N"): the allocator's
    words, what the plan predicted for the budget, what is kept, and what to do."""
    from lowmem.planner import BudgetError

    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    predicted = ""
    if plan.breakdown is not None:
        predicted = (f"the plan predicted a peak of {format_size(plan.breakdown.total)} ({plan.breakdown.phase})"
                     + (f" for --vram {format_size(plan.vram)}" if plan.vram else "") + ", and ")
    saved = list_checkpoints(run_dir)
    kept = (f"the newest checkpoint, {saved[-1].name}, is intact: with the GPU freed, "
            f"`{train_command(f'--resume {run_dir}')}` continues" if saved else "no checkpoint was written yet")
    return BudgetError(f"out of GPU memory{when} ({said}); {predicted}whatever else runs on the GPU takes "
                       f"from the budget too (nvidia-smi lists it). {kept[0].upper()}{kept[1:]}; or start "
                       f"a new run with a smaller --vram or a larger safety_margin, which plans with more room")


def write_final(run_dir: Path, name: str, write, checkpoint: Path) -> None:
    """The run's end, adapter/ or model/, written whole or not at all: `write` fills a hidden
    folder beside it, renamed into place when complete, so nothing (generate, export) ever
    reads a half-written one. A full disk is a CheckpointError that says the run's newest
    checkpoint holds what it trained and that a resume writes the end again."""
    from safetensors import SafetensorError

    target, tmp, old = run_dir / name, run_dir / f".{name}.tmp", run_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if target.exists():     # the end written again (a resume from the last step's checkpoint)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{target}: cannot be written ({getattr(e, 'strerror', None) or e}); the "
                              f"checkpoint {checkpoint.name} holds everything trained: once the folder can be "
                              f"written (a full disk, permissions), `{train_command(f'--resume {run_dir}')}` "
                              f"writes it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter_for(model, plan: Plan, config: RunConfig, folder: Path, model_dir: Path) -> Path:
    # The base is named by the absolute folder the run loaded, which PEFT and transformers open
    # offline from any directory; `config.model` may be relative or the embedded model's name.
    base_model = str(Path(model_dir).resolve())
    if plan.method == "loram":  # recovered to the full model's shapes, PEFT layout
        from lowmem.loram import save_recovered_adapter

        return save_recovered_adapter(model, folder, rank=plan.lora_rank, alpha=plan.lora_alpha,
                                      targets=plan.lora_targets, dropout=plan.lora_dropout,
                                      rslora=plan.lora_rslora, base_model=base_model)
    if plan.method == "l4q":   # LoRA + step sizes + offsets; `lowmem export` reads them
        from lowmem.quant.l4q import save_l4q_state

        return save_l4q_state(model, folder, base_model=base_model)
    return save_adapter(model, folder, rank=plan.lora_rank, alpha=plan.lora_alpha,
                        targets=plan.lora_targets, dropout=plan.lora_dropout,
                        rslora=plan.lora_rslora, base_model=base_model)
