"""Checkpoints that a crash or a full disk cannot destroy, and exact resume.

A checkpoint is written into `checkpoints/.tmp-step-N-*`, each file and folder
fsynced, and only then renamed to `checkpoints/step-N`; the `latest` pointer is
replaced atomically after that, and older checkpoints are pruned only then. So
at any instant the previous checkpoint is whole. `manifest.json` (written
last) lists every file's size and SHA-256; a checkpoint whose files do not
match it is reported and skipped on resume.

Contents: trainable weights (`trainable.safetensors`), optimizer state
(`optimizer.pt`, 8-bit states stored as they are), every RNG state (`rng.pt`),
`state.json` (step, data position, anything else the loop needs), and the
resolved `config.yaml` and `plan.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from lowmem.errors import CheckpointError, ModelError
from lowmem.events import LOCK, this_host

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"


class RunLock:
    """An exclusive lock on a run directory while a trainer works in it, so a second trainer
    cannot resume a run that is still training. fcntl.flock: the system releases it when the
    process ends, however it ends, so a crash never leaves a run locked. The file names the
    holder (pid and host) for the error a second trainer gets.

    The lock belongs to the open file, not the process: a child given `fd` (its descriptor,
    inherited through `pass_fds`) holds the same lock, so the dashboard's trainer takes the
    run over from `lowmem train` with no moment where the run is free. (Not on NFS, whose
    client emulates flock with per-process locks: there the child takes the lock once the
    parent has let it go.)"""

    _held: dict[Path, int] = {}   # run directories this process holds, and how deep

    def __init__(self, run_dir: Path, *, holder: bool = True, reenter: bool = False, fd: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.holder = holder      # write this process in as the holder (a trainer), or only look
        self.reenter = reenter    # pass when this process holds it already (`lowmem train` holds it
                                  # from its checks to the end, and the trainer it runs takes it again)
        self.inherited = fd       # the descriptor of a lock the parent took, handed down
        self._fd: int | None = None
        self._nested = False

    @property
    def fd(self) -> int | None:
        """The locked descriptor, for a child process to take over; None where nothing is locked."""
        return self._fd

    def __enter__(self) -> "RunLock":
        key = self.run_dir.resolve()
        if self.reenter and key in RunLock._held:
            RunLock._held[key] += 1
            self._nested = True
            return self
        try:
            import fcntl
        except ImportError:      # not a POSIX system: no lock, as before
            return self
        # An inherited descriptor is locked already: flock on it again succeeds, and checks that.
        try:
            fd = self.inherited if self.inherited is not None else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:      # a read-only file system, a run directory not ours
            raise CheckpointError(f"{self.run_dir}: cannot be written ({e.strerror or e}), so no run can "
                                  f"go on in it; a run directory must be writable") from None
        if self.inherited is not None:
            os.set_inheritable(fd, False)     # a program the trainer starts must not hold the run
        try:
            _flock(fcntl, fd, wait_s=10.0 if self.inherited is not None else 0.0)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{self.run_dir} is in use by a trainer ({holder}): wait for it to end, or "
                                  f"stop it (`lowmem monitor {self.run_dir}`, then q) and resume") from None
        except OSError:           # a file system without flock (Lustre's noflock, some FUSE): no lock
            os.close(fd)
            return self
        if self.holder:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {this_host()}".encode(), 0)
        self._fd = fd
        RunLock._held[key] = 1
        return self

    def __exit__(self, *exc) -> None:
        key = self.run_dir.resolve()
        if self._nested:
            RunLock._held[key] -= 1
            self._nested = False
        elif self._fd is not None:
            os.close(self._fd)     # closing releases the lock
            self._fd = None
            RunLock._held.pop(key, None)


def _flock(fcntl, fd: int, wait_s: float) -> None:
    """flock(LOCK_EX | LOCK_NB) on `fd`, tried again for up to `wait_s` seconds: a descriptor
    handed down on NFS is free only once the parent that locked it lets go."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def check_unlocked(run_dir: Path) -> None:
    """CheckpointError naming the holder when a trainer is working in `run_dir` now."""
    with RunLock(run_dir, holder=False):
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save; a failed write (a full disk) is raised as the OSError it is, which torch
    reports as a RuntimeError of its own ("unexpected pos ..."). Not fsynced here: the
    checkpoint's whole folder is, before its rename."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def _fsync_path(path: Path) -> None:
    """Flush a file written by another library, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_modes(folder: Path) -> list[Path]:
    """Give `folder` and everything in it the modes a new file gets under the umask, like the
    rest of a run or an export (mkdtemp makes 0700 folders, safetensors 0600 files); returns
    them, the deepest first and `folder` last."""
    mask = os.umask(0)
    os.umask(mask)
    paths = sorted(folder.rglob("*"), reverse=True) + [folder]
    for path in paths:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return paths


def write_run_file(path: Path, text: str) -> None:
    """Replace a run directory's file (config.yaml, plan.yaml) whole or not at all: a write that
    fails (a full disk) leaves the old one, never an empty or cut one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _fsync_write(tmp, text.encode())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot be written ({e.strerror or e}); it is unchanged") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: dict, state: dict, config: dict, plan: dict, keep: int,
                    extra_dirs: dict[str, callable] | None = None) -> Path:
    """Write `checkpoints/step-{step}` atomically and keep the newest `keep`.

    `extra_dirs` maps a folder name to a function that writes into that folder
    (e.g. the adapter in PEFT layout); they are covered by the manifest too.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        _torch_save(optimizer, tmp / "optimizer.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        _fsync_write(tmp / "state.json", json.dumps({"step": step, **state}, indent=2).encode())
        _fsync_write(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
        _fsync_write(tmp / "plan.yaml", yaml.safe_dump(plan, sort_keys=False).encode())
        for name, write in (extra_dirs or {}).items():
            write(tmp / name)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in files}
        _fsync_write(tmp / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=2).encode())
        # On the disk before the rename, and so before the pruning that follows it: a power loss
        # must not leave a renamed checkpoint of unwritten data in place of the one it replaced.
        for path in share_modes(tmp):
            _fsync_path(path)
        if final.exists():  # a re-save of the same step (e.g. `s` pressed right at the end)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(root)
    except (OSError, SafetensorError) as e:   # a full disk, a quota
        shutil.rmtree(tmp, ignore_errors=True)
        whole = [c for c in list_checkpoints(run_dir) if c != final]
        kept = (f"the newest whole one, {whole[-1].name}, is untouched: free space, then resume from it"
                if whole else "no earlier checkpoint exists")
        raise CheckpointError(f"cannot write checkpoint step-{step} in {root} "
                              f"({getattr(e, 'strerror', None) or e}); {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp"
    _fsync_write(pointer, final.name.encode())
    os.replace(pointer, root / LATEST)
    _fsync_path(root)
    prune_checkpoints(run_dir, keep, final)
    return final


def prune_checkpoints(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints (never `newest`, the one a run holds now)
    and the half-done writes a killed trainer left."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_step(folder: Path) -> int:
    """N of a `step-N` checkpoint folder."""
    return int(folder.name[5:])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def verify(folder: Path) -> str | None:
    """None when the checkpoint matches its manifest, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "manifest is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= e.keys()
                                              for e in files.values()):
        return "manifest does not list the files with their sizes and checksums"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['bytes']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resumable(run_dir: Path, warn=print) -> Path:
    """The newest checkpoint that verifies; warns about bad ones.

    By step, not by `latest`: a trainer killed between renaming a checkpoint into place
    and moving the pointer leaves a newer one that is complete (its manifest was written
    last). Resuming from the pointer instead would start a second timeline beside it,
    whose checkpoints pruning by step would then delete first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    candidates = list_checkpoints(run_dir)
    problems = []
    for folder in reversed(candidates):
        problem = verify(folder)
        if problem is None:
            return folder
        problems.append(f"{folder.name}: {problem}")
        warn(f"checkpoint {folder} is damaged ({problem}); trying the previous one")
    if problems:
        raise CheckpointError(f"{run_dir} has no valid checkpoint; every one is damaged: "
                              + "; ".join(problems))
    raise CheckpointError(f"{run_dir} has no checkpoint (none was written yet)")


def set_aside_damaged(run_dir: Path, resumed: Path) -> list[Path]:
    """Rename the damaged checkpoints newer than `resumed` (the one a run resumes from) to
    `.damaged-step-N`: kept for a look, but out of `list_checkpoints`, so that pruning the
    oldest does not delete a good checkpoint and keep a damaged one. Returns the new paths."""
    step = checkpoint_step(resumed)
    moved = []
    for folder in list_checkpoints(run_dir):
        if checkpoint_step(folder) > step and verify(folder) is not None:
            target = folder.with_name(f".damaged-{folder.name}")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.rename(folder, target)
            moved.append(target)
    return moved


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """trainable, optimizer, rng, state, config, plan of a verified checkpoint."""
    from safetensors.torch import load_file

    return {
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
        "rng": torch.load(folder / "rng.pt", weights_only=False),
        "state": json.loads((folder / "state.json").read_text()),
        "config": yaml.safe_load((folder / "config.yaml").read_text()),
        "plan": yaml.safe_load((folder / "plan.yaml").read_text()),
    }


def run_holding(folder: Path) -> Path | None:
    """The run directory a folder of its weights is part of (RUN/adapter, RUN/adapter-step-N,
    RUN/model, RUN/model-step-N, RUN/checkpoints/step-N/adapter), or None."""
    folder = Path(folder)
    inside = [folder.parent] if folder.name in ("adapter", "model") or folder.name.startswith(
        ("adapter-step-", "model-step-")) else []
    if folder.name == "adapter" and folder.parent.parent.name == "checkpoints":
        inside = [folder.parent.parent.parent]
    return next((d for d in inside if (d / "config.yaml").is_file()), None)


def run_identity(run_dir: Path) -> tuple[str, str]:
    """(model reference, method) of a run directory, read from its config.yaml and plan.yaml;
    ModelError naming the file that is missing, unreadable or lacks the key."""
    def read(name: str, key: str) -> str:
        path = Path(run_dir) / name
        try:
            found = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{run_dir} is not a run directory (no {name})") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ModelError(f"{path} cannot be read ({str(e).splitlines()[0]})") from None
        value = found.get(key) if isinstance(found, dict) else None
        if not isinstance(value, str) or not value:
            raise ModelError(f"{path}: no '{key}' in it; the run directory is damaged")
        return value

    return read("config.yaml", "model"), read("plan.yaml", "method")


def run_adapter_folder(run_dir: Path, marker: str, warn=lambda message: None) -> tuple[Path | None, str]:
    """(run_dir/adapter if it holds `marker`, else the newest valid checkpoint's adapter folder,
    or None; why not run_dir/adapter: the run has not finished, its adapter/ is gone though it
    finished, or why there is no adapter at all)."""
    from lowmem.events import iter_events

    run_dir = Path(run_dir)
    if (run_dir / "adapter" / marker).is_file():
        return run_dir / "adapter", ""
    try:
        folder = find_resumable(run_dir, warn=warn) / "adapter"   # warned of the damaged ones it passed
    except CheckpointError as e:
        return None, str(e)
    if not (folder / marker).is_file():
        return None, f"{folder} lacks {marker}"
    # The end of its latest session: a run trained further has set its adapter/ aside.
    end = None
    for event in iter_events(run_dir):
        if event.get("kind") == "start":
            end = None
        elif event.get("kind") == "done" and end is None:
            end = event
    if end is not None and end.get("reason") == "finished":
        return folder, f"{run_dir / 'adapter'} lacks {marker}, though the run finished at step {end.get('step')}"
    return folder, f"{run_dir} has not finished"

