import pytest
import torch

from lowmem.checkpoint import (find_resumable, list_checkpoints, load_checkpoint, save_checkpoint,
                               verify)
from lowmem.errors import CheckpointError


def _save(run_dir, step, keep=3, extra=None):
    return save_checkpoint(run_dir, step, trainable={"w": torch.full((4,), float(step))},
                           optimizer={"state": {}, "param_groups": []}, state={"data": {"epoch": 0}},
                           config={"steps": 10}, plan={"method": "lora"}, keep=keep, extra_dirs=extra)


def test_checkpoint_round_trips_and_points_latest(tmp_path):
    _save(tmp_path, 2)
    folder = _save(tmp_path, 4)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-4"
    assert find_resumable(tmp_path) == folder
    loaded = load_checkpoint(folder)
    assert loaded["state"]["step"] == 4 and torch.equal(loaded["trainable"]["w"], torch.full((4,), 4.0))


def test_only_the_newest_k_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]


def test_a_complete_checkpoint_the_pointer_never_reached_is_resumed_and_never_pruned(tmp_path):
    """Killed between the rename and the pointer: step-6 is whole, `latest` still says step-4.
    Resuming from step-4 would run a second timeline whose checkpoints (step-5) the pruning by
    step deletes first, and the run after would resume from the stale step-6."""
    from lowmem.checkpoint import prune_checkpoints

    _save(tmp_path, 4, keep=1)
    newest = _save(tmp_path, 6, keep=1)
    (tmp_path / "checkpoints" / "latest").write_text("step-4")
    assert find_resumable(tmp_path) == newest
    # The one just written survives a keep of 1 whatever else is there.
    (tmp_path / "checkpoints" / "step-6").rename(tmp_path / "checkpoints" / "step-9")
    assert (_save(tmp_path, 7, keep=1)).is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-7", "step-9"]
    # A resume clears what kills left: half-done writes and checkpoints beyond the keep.
    (tmp_path / "checkpoints" / ".tmp-step-8-x").mkdir()
    prune_checkpoints(tmp_path, 1, tmp_path / "checkpoints" / "step-9")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-9"]


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    good = _save(tmp_path, 1)

    def crash(folder):
        folder.mkdir()
        (folder / "half").write_bytes(b"x")
        raise OSError("No space left on device")

    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step-2 in .* \(No space left on device\); "
                                              r"the newest whole one, step-1, is untouched"):
        _save(tmp_path, 2, extra={"adapter": crash})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert find_resumable(tmp_path) == good and verify(good) is None


def test_a_full_disk_under_torch_save_is_the_same_one_line_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError of its own, the OSError as its context."""
    good = _save(tmp_path, 1)

    def full_disk(obj, f):
        f.write(b"partial")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step-2 in .* \(No space left on device\); "
                                              r"the newest whole one, step-1, is untouched"):
        _save(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [good] and not list((tmp_path / "checkpoints").glob(".tmp-*"))

    def broken(obj, f):
        raise RuntimeError("cannot pickle this")     # not a write that failed: not dressed as one

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        _save(tmp_path, 2)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_has_the_modes_the_umask_gives_like_the_rest_of_the_run(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = _save(tmp_path, 1, extra={"adapter": lambda d: (d.mkdir(), (d / "a.json").write_text("{}"))})
    finally:
        os.umask(previous)
    modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes.pop(".") == modes.pop("adapter") == 0o755
    assert set(modes.values()) == {0o644} and "trainable.safetensors" in modes


def test_a_corrupted_latest_is_reported_and_the_previous_one_used(tmp_path):
    previous = _save(tmp_path, 1)
    latest = _save(tmp_path, 2)
    data = (latest / "trainable.safetensors").read_bytes()
    (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    warnings = []
    assert find_resumable(tmp_path, warn=warnings.append) == previous
    assert "step-2" in warnings[0] and "trainable.safetensors" in warnings[0]


def test_no_valid_checkpoint_is_an_error(tmp_path):
    only = _save(tmp_path, 1)
    (only / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_resumable(tmp_path, warn=lambda m: None)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resumable(tmp_path / "nope")


def test_a_manifest_without_its_file_list_is_damage_not_a_crash(tmp_path):
    previous = _save(tmp_path, 1)
    latest = _save(tmp_path, 2)
    for text in ('{"step": 2}', '[1, 2]', '{"files": {"rng.pt": 3}}'):
        (latest / "manifest.json").write_text(text)
        assert "does not list the files" in verify(latest)
        assert find_resumable(tmp_path, warn=lambda m: None) == previous


def test_when_every_checkpoint_is_damaged_the_error_says_what_is_wrong_with_each(tmp_path):
    for step in (1, 2):
        folder = _save(tmp_path, step)
        (folder / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match=r"every one is damaged: step-2: rng.pt is missing; "
                                              r"step-1: rng.pt is missing"):
        find_resumable(tmp_path, warn=lambda m: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no checkpoint \(none was written yet\)"):
        find_resumable(tmp_path / "empty")


def test_a_save_clears_what_killed_writes_left_and_damaged_newer_ones_are_set_aside(tmp_path):
    from lowmem.checkpoint import set_aside_damaged

    good = _save(tmp_path, 1)
    damaged = _save(tmp_path, 2)
    (damaged / "rng.pt").write_bytes(b"x")
    stale = tmp_path / "checkpoints" / ".tmp-step-3-abc"
    stale.mkdir()
    assert set_aside_damaged(tmp_path, good) == [tmp_path / "checkpoints" / ".damaged-step-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    _save(tmp_path, 3, keep=2)            # would have pruned the good step-1 and kept step-2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1", "step-3"]
    assert not stale.exists()


def test_a_run_directory_that_cannot_be_written_is_a_checkpoint_error(tmp_path, monkeypatch):
    import errno

    from lowmem import checkpoint
    from lowmem.checkpoint import RunLock

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint.os, "open", read_only)
    with pytest.raises(CheckpointError, match=r"cannot be written \(Read-only file system\), so no run can go on"):
        with RunLock(tmp_path):
            pass


def test_a_second_trainer_cannot_lock_a_run_directory_while_one_holds_it(tmp_path):
    from lowmem.checkpoint import RunLock, check_unlocked

    with RunLock(tmp_path):
        with pytest.raises(CheckpointError, match=r"in use by a trainer \(pid \d+ on "):
            check_unlocked(tmp_path)
    check_unlocked(tmp_path)            # released when its holder lets go
