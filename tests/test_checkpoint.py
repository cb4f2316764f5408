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


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    good = _save(tmp_path, 1)

    def crash(folder):
        folder.mkdir()
        (folder / "half").write_bytes(b"x")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        _save(tmp_path, 2, extra={"adapter": crash})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert find_resumable(tmp_path) == good and verify(good) is None


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
