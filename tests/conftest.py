"""Shared fixtures: tiny models built from a config, the embedded model, tiny datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def host_with_64g_free(monkeypatch):
    """Plans made in-process see 64 GiB of free host RAM, whatever this machine has free now,
    so that a test's plan does not depend on the machine (a test sets host_ram to vary it)."""
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 64 * 2**30)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: with several threads, start-up and spin-waiting cost more than the work,
    by 100x on a busy 2-core machine (measured: 2.8 s vs 25 ms per tiny-model step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M as a cached Hugging Face folder (converted once)."""
    from lowmem.model import resolve_model_dir

    return resolve_model_dir("smollm2-135m", log=lambda m: None)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from lowmem.model import load_tokenizer

    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir, tokenizer) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved in two safetensors shards."""
    from lowmem.model import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=32, layers=2, heads=4, kv_heads=2,
                       intermediate=64, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder, max_shard_size="2MB")
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_chat_data(tmp_path) -> Path:
    records = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                             {"role": "assistant", "content": str(i)}]} for i in range(24)]
    return write_jsonl(tmp_path / "chat.jsonl", records)
