"""Held-out evaluation: answer-token loss and exact match of generated answers.

Exact match compares the greedy answer to the reference after trimming
whitespace, a final period and case: "Paris." equals "paris", "The capital is
Paris" does not. It is the task metric of the embedded dataset, whose answers
are short and unique.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lowmem.data import Example, collate, decoder_inputs, render_chat
from lowmem.loss import causal_lm_loss, count_targets


def normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


def autocast_for(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: progress(phase, done, total): called after each batch, phase "loss" or "answers".
OnProgress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, device: str, batch_size: int = 16,
                 progress: OnProgress = _no_progress) -> float:
    """Mean next-token loss over every labelled token of the held-out examples.

    Batches are right-padded, so no attention mask is needed (see data.decoder_inputs).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        with autocast_for(device):
            hidden = model.get_decoder()(**decoder_inputs(batch)).last_hidden_state
            total += float(causal_lm_loss(hidden, model.get_output_embeddings().weight,
                                          batch["labels"], reduction="sum"))
        count += count_targets(batch["labels"])
        progress("loss", min(i + batch_size, len(examples)), len(examples))
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], device: str, max_new_tokens: int,
             batch_size: int = 40, progress: OnProgress = _no_progress) -> list[str]:
    """Greedy answers to chat prompts (lists of messages), batched with left padding."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [render_chat(tokenizer, list(p), add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with autocast_for(device):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id,
                                     use_cache=True)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            progress("answers", len(answers), len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def evaluate(model, tokenizer, examples: list[Example], device: str, *, generate_answers: bool,
             max_new_tokens: int, progress: OnProgress = _no_progress) -> dict:
    """{loss, exact_match (None without generation or answers), examples, samples}."""
    result = {"loss": heldout_loss(model, examples, tokenizer.pad_token_id, device, progress=progress),
              "exact_match": None, "examples": len(examples), "samples": []}
    answerable = [e for e in examples if e.prompt is not None]
    if generate_answers and answerable:
        predictions = generate(model, tokenizer, [list(e.prompt) for e in answerable], device, max_new_tokens,
                               progress=progress)
        hits = [normalize(p) == normalize(e.answer) for p, e in zip(predictions, answerable)]
        result["exact_match"] = sum(hits) / len(hits)
        result["samples"] = [{"prompt": e.prompt[-1]["content"], "expected": e.answer, "got": p}
                             for p, e in list(zip(predictions, answerable))[:3]]
    return result
