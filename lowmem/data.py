"""Data files to token batches, with loss only where the model should learn.

Accepted records:
  - chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  - instruction: {"instruction": "...", "input": "..." (optional), "output": "..."}
  - ShareGPT:    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
                 ("from", in any case, may also be user, assistant, chatgpt, bing or bard;
                 a turn may also be a chat message, {"role", "content"}; a "system" text
                 beside the turns opens the conversation)
  - prompt/completion: {"prompt": "...", "completion": "..."}, or both lists of chat
                 messages (TRL's conversational form), the completion's all assistant turns
  - text:        {"text": "..."}
in a `.jsonl` file, or a `.json` file holding a list of them, and plain `.txt`
files (the whole file is text, cut into seq_len pieces). A byte-order mark is
skipped. A record with several layouts' keys is read as the first of them in
the order above (a "prompt" counts only with its "completion"), so "text" is
read only when the record is none of the others; other keys are ignored.
Every layout but text becomes chat messages and trains on the assistant's
tokens only (labels are -100 elsewhere): the output, the completion (not a
conversational prompt's own assistant turns: they are context, as in TRL); a
chat message marked "train": false stays out of the loss too. Text trains on
every token. `embedded` is the shipped task dataset with its fixed
held-out split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from lowmem.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt: tuple[dict, ...] | None = None   # chat messages before the final answer (for generation)
    answer: str | None = None                # the final assistant message (for exact match)
    segments: tuple[int, ...] = ()           # packed: the lengths of the examples it holds, in order


# ---------------------------------------------------------------- reading records

class Record(tuple):
    """(messages, None) or (None, text), and `where` it was read: the file and line or record
    number that an error in a later stage (the chat template) names."""

    where: str

    def __new__(cls, messages: list[dict] | None, text: str | None, where: str = "a record"):
        record = super().__new__(cls, (messages, text))
        record.where = where
        return record


def embedded_paths() -> tuple[Path, Path]:
    folder = Path(str(resources.files("lowmem.datasets")))
    return folder / "tasks-train.jsonl", folder / "tasks-heldout.jsonl"


# ShareGPT's speaker names ("from") and the chat roles they are.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def _shown(value, width: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width] + "..."


def _message_list(record: dict, key: str, where: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, got {_shown(value, 40)}")
    return value


def learned(message: dict) -> bool:
    """Whether a chat message is in the loss: an assistant turn not marked "train": false."""
    return message["role"] == "assistant" and message.get("train", True)


def _checked_chat(messages: list, where: str) -> list[dict]:
    """The checks every conversation passes, whichever layout it was written in."""
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) "
                            f"and a text content, got {_shown(m)}")
        if not isinstance(m.get("train", True), bool):
            raise DataError(f"{where}: a message's 'train' must be true or false, got {_shown(m['train'], 40)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    if not any(learned(m) for m in messages):
        raise DataError(f'{where}: every assistant message has "train": false, so nothing to learn from')
    for m in messages:
        if learned(m) and not m["content"].strip():
            raise DataError(f"{where}: an assistant answer to learn is empty; the model would learn to "
                            f'answer nothing. Fill it in or leave the record out (in a chat, "train": false '
                            f"keeps an answer out of the loss)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation opens with the assistant, so nothing prompts its "
                        f"first answer; start with a user (or system) message")
    return messages


def _from_sharegpt(turns: list, where: str) -> list:
    """ShareGPT turns as chat messages; {"role", "content"} turns pass as they are."""
    messages = []
    for turn in turns:
        if isinstance(turn, dict) and "from" in turn:
            role = SHAREGPT_ROLES.get(turn["from"].lower()) if isinstance(turn["from"], str) else None
            if role is None:
                raise DataError(f"{where}: unknown ShareGPT speaker 'from': {_shown(turn['from'], 40)}; "
                                f"expected one of {', '.join(SHAREGPT_ROLES)}")
            if not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: each ShareGPT turn needs 'value' as text, got {_shown(turn)}")
            messages.append({"role": role, "content": turn["value"]})
        elif isinstance(turn, dict) and "role" in turn:
            messages.append(turn)
        else:
            raise DataError(f"{where}: each turn in 'conversations' needs 'from' and 'value' "
                            f"(or 'role' and 'content'), got {_shown(turn)}")
    return messages


def _from_prompt_completion(record: dict, where: str) -> list:
    """Text: one user turn and one assistant turn. Lists: the prompt's messages, then the completion's."""
    prompt, completion = record["prompt"], record["completion"]
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: a prompt/completion record needs {key!r} as text or as a list of "
                            f"messages, got {_shown(value, 40)}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, str) or isinstance(completion, str):
        raise DataError(f"{where}: 'prompt' and 'completion' must be both text or both lists of messages, got "
                        f"{'text' if isinstance(prompt, str) else 'a list'} and "
                        f"{'text' if isinstance(completion, str) else 'a list'}")
    prompt, completion = _message_list(record, "prompt", where), _message_list(record, "completion", where)
    # Only the completion is learned: the prompt's own assistant turns are context, as in TRL.
    prompt = [{**m, "train": False} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
    for m in completion:
        # The completion is what is learned; a user turn in it would be trained on as if it were an answer.
        if isinstance(m, dict) and m.get("role") != "assistant":
            raise DataError(f"{where}: the messages in 'completion' must be assistant turns (the prompt's "
                            f"go in 'prompt'), got {_shown(m)}")
    return prompt + completion


def _as_messages(record: dict, where: str) -> list[dict] | None:
    """Chat messages for every layout but text, None for text records; the layouts are tried
    in the order the module docstring lists them."""
    if "messages" in record:
        return _checked_chat(_message_list(record, "messages", where), where)
    if "instruction" in record:
        for key, required in (("instruction", True), ("output", True), ("input", False)):
            value = record.get(key)
            if required and key not in record:
                raise DataError(f"{where}: an instruction record needs {key!r} (text), and this one has none")
            if (required or value is not None) and not isinstance(value, str):
                raise DataError(f"{where}: an instruction record needs {key!r} as text"
                                + ("" if required else " (or leave it out)") + f", got {_shown(value, 40)}")
        prompt = record["instruction"]
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        return _checked_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}],
                             where)
    if "conversations" in record:
        messages = _from_sharegpt(_message_list(record, "conversations", where), where)
        system = record.get("system")      # some ShareGPT files give the system prompt beside the turns
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' beside 'conversations' must be text, got {_shown(system, 40)}")
        if system and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        return _checked_chat(messages, where)
    if "prompt" in record and "completion" in record:
        return _checked_chat(_from_prompt_completion(record, where), where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return None
    raise DataError(f"{where}: expected a record with 'messages', 'instruction'/'output', 'conversations', "
                    f"'prompt'/'completion' or 'text', got keys {sorted(record)}")


def read_records(path: Path, what: str = "data") -> list[Record]:
    """(messages, None) or (None, text) per record; errors name the file and line (and `what`
    the file is for, when it is missing: "data", "held-out data")."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a .jsonl, .json or .txt {what} file")
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt"):
        raise DataError(f"{path}: expected a .jsonl file (one JSON record per line), a .json list of "
                        f"records, or a .txt file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")       # a byte-order mark is not data
    except UnicodeDecodeError as e:
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:at].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    if suffix == ".txt":
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        return [Record(None, text, str(path))]
    whole = None
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg}; column {e.colno})") from None
    if isinstance(whole, dict):
        # One object ({"data": [...]}, or a lone record): a .json file is a list of records.
        raise DataError(f"{path}: holds one JSON object (keys {sorted(whole)[:5]}), not a list; a .json file "
                        f"holds a list of records, [{{...}}, {{...}}] (or name it .jsonl, one record per line)")
    if isinstance(whole, list):
        lines = [(f"{path}: record {i}", item) for i, item in enumerate(whole, 1)]
    else:
        lines = []
        for number, line in enumerate(text.split("\n"), 1):   # not splitlines: U+2028 may sit in a string
            if not line.strip():
                continue
            try:
                lines.append((f"{path}: line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: malformed JSON ({e.msg}; column {e.colno})") from None
    records = []
    for where, record in lines:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        messages = _as_messages(record, where)
        records.append(Record(messages, None, where) if messages is not None else Record(None, record["text"], where))
    if not records:
        raise DataError(f"{path}: no records; the dataset is empty")
    return records


# ---------------------------------------------------------------- tokenizing

def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]   # no "train" in templates
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # A base model without a template: a plain, stable layout. An answer ends with the end-of-
    # sequence token, inside the learned span, so the tuned model learns to stop.
    eos = getattr(tokenizer, "eos_token", None) or ""
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
                   for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are the ids of tokens that overlap learned assistant turns
    (`learned`), -100 elsewhere.

    An assistant turn's span is the text between the rendering of the messages
    before it (with the generation prompt) and the rendering including it, so
    the end-of-turn marker is learned too. Some templates render a turn otherwise
    once more follow it (Qwen3 drops the empty reasoning block from earlier answers;
    Mistral's puts the system prompt into the last user turn), so those renderings
    are not prefixes of the whole: the turn is then found by rendering the whole with a
    marker in place of its text (_found_turn). A token that begins before an answer and
    ends inside it (Mistral's " Paris") is the answer's. A template that raises (roles
    that must alternate, no system role) raises DataError.
    """
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"the model's tokenizer ({type(tokenizer).__name__}) has no fast version, which lowmem "
                        f"needs to tell an answer's tokens from the prompt's; a tokenizer.json in the model "
                        f"folder gives it one")
    try:
        full = render_chat(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if not learned(m):
                continue
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            through = render_chat(tokenizer, messages[: i + 1])
            if full.startswith(through) and through.startswith(before):
                spans.append((len(before), len(through)))
            else:
                spans.append(_found_turn(tokenizer, messages, full, i))
    except TemplateError as e:
        raise DataError(f"the model's chat template refused this conversation: {e}") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(a < e and b > s for s, e in spans) else IGNORE
              for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


#: Stands in for an answer's text to find where a template puts it: private-use characters,
#: in no real text.
ANSWER_MARK = "\ue000lowmem answer\ue001"


def _found_turn(tokenizer, messages: list[dict], full: str, i: int) -> tuple[int, int]:
    """The span of assistant message `i` in `full`, the whole conversation's rendering: where
    the whole, rendered with ANSWER_MARK for the message's text, puts the mark (the same text
    before it), the text as the template writes it (as given, or trimmed), and as much of the
    end-of-turn marker that follows the mark in the rendering ending with it as follows the
    answer in `full`."""
    def unplaced(why: str) -> DataError:
        return DataError(f"the model's chat template renders message {i + 1} (an assistant turn) differently "
                         f"on its own than inside the whole conversation, and {why}, so lowmem cannot tell "
                         f"which tokens to learn")

    marked = messages[:i] + [{**messages[i], "content": ANSWER_MARK}]
    whole = render_chat(tokenizer, marked + messages[i + 1:])
    at = whole.find(ANSWER_MARK)
    if at < 0 or whole.count(ANSWER_MARK) != 1 or whole[:at] != full[:at]:
        raise unplaced("the template does not write the answer's text once, where it stands")
    content = messages[i]["content"]
    text = next((t for t in (content, content.strip()) if full.startswith(t, at)), None)
    if text is None:
        raise unplaced("the template changes the answer's text")
    end = at + len(text)
    own = render_chat(tokenizer, marked)
    marker = own[own.find(ANSWER_MARK) + len(ANSWER_MARK):]
    n = 0
    while n < len(marker) and end + n < len(full) and full[end + n] == marker[n]:
        n += 1
    return at, end + n


def build_examples(records, tokenizer, seq_len: int) -> tuple[list[Example], int, int]:
    """Examples; how many were cut to seq_len; how many were dropped, their answers wholly past it."""
    examples, truncated, dropped = [], 0, 0
    for record in records:
        messages, text = record
        if messages is not None:
            try:
                ids, labels = tokenize_chat(tokenizer, messages)
            except DataError as e:
                raise DataError(f"{getattr(record, 'where', 'a record')}: {e}") from None
            prompt = answer = None
            if messages[-1]["role"] == "assistant":
                prompt, answer = tuple(messages[:-1]), messages[-1]["content"]
            cut = len(ids) > seq_len
            ids, labels = ids[:seq_len], labels[:seq_len]
            if any(l != IGNORE for l in labels):
                examples.append(Example(tuple(ids), tuple(labels), prompt, answer))
                truncated += cut
            else:
                dropped += 1
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            # Long text is cut into seq_len pieces rather than truncated: it is all data.
            for i in range(0, len(ids), seq_len):
                piece = ids[i:i + seq_len]
                if len(piece) > 1:
                    examples.append(Example(tuple(piece), tuple(piece)))
    return examples, truncated, dropped


def fingerprint(examples: list[Example]) -> str:
    """SHA-256 of every example's tokens and labels, in order."""
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.input_ids, e.labels)).encode())
    return h.hexdigest()


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples into sequences of at most seq_len tokens (greedy, in order).

    Each packed sequence keeps its examples' lengths (`segments`): `collate`
    restarts the positions at each one, and the model then attends within an
    example only (see `decoder_inputs`). Each example's first token is no target,
    as it is not when the example trains alone: nothing of it comes before.
    """
    packed, ids, labels, segments = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > seq_len:
            packed.append(Example(tuple(ids), tuple(labels), segments=tuple(segments)))
            ids, labels, segments = [], [], []
        ids += ex.input_ids
        labels += (IGNORE,) + ex.labels[1:]
        segments.append(len(ex.input_ids))
    if ids:
        packed.append(Example(tuple(ids), tuple(labels), segments=tuple(segments)))
    return packed


@dataclass
class Datasets:
    train: list[Example]
    heldout: list[Example]
    truncated: int          # examples cut to seq_len (train and held-out)
    source: str
    dropped: int = 0        # training examples left out: no answer token within seq_len
    heldout_dropped: int = 0


def split_records(config) -> tuple[list, list]:
    """(training records, held-out records) for a RunConfig, read and split, not tokenized."""
    eval_path = Path(config.eval_data).expanduser() if config.eval_data else None
    if config.data == "embedded":
        train_path, heldout_path = embedded_paths()
        return read_records(train_path), read_records(eval_path or heldout_path,
                                                      "held-out data (--eval-data)" if eval_path else "held-out data")
    train_records = read_records(Path(config.data).expanduser())
    if eval_path is not None:
        return train_records, read_records(eval_path, "held-out data (--eval-data)")
    if len(train_records) == 1 and train_records[0][1] is not None and config.eval_fraction > 0:
        return split_text(train_records[0][1], config.eval_fraction)
    # A fixed split: the same records are held out on every run with this seed.
    order = list(range(len(train_records)))
    random.Random(config.seed).shuffle(order)
    held = set(order[:int(len(order) * config.eval_fraction)])
    return ([r for i, r in enumerate(train_records) if i not in held],
            [r for i, r in enumerate(train_records) if i in held])


def split_text(text: str, fraction: float) -> tuple[list, list]:
    """One text (a .txt file): its last `fraction`, from a line break (else a space), held out,
    where records cannot be split because there is one. Too short to cut: all of it trains."""
    at = int(len(text) * (1 - fraction))
    line = text.rfind("\n", 0, at)
    if line < at - len(text) * fraction:     # no line break near: a title over one paragraph
        line = -1
    cut = next((i + 1 for i in (line, text.rfind(" ", 0, at)) if i > 0), -1)
    if cut <= 0 or not text[:cut].strip() or not text[cut:].strip():
        return [(None, text)], []
    return [(None, text[:cut])], [(None, text[cut:])]


def _nothing_to_learn(config, dropped: int) -> DataError:
    why = (f": at seq_len={config.seq_len} the prompts fill every sequence, so no answer token "
           f"is left to learn; raise seq_len" if dropped else "")
    return DataError(f"{config.data}: no example has tokens to learn from{why}")


def check_learnable(config, tokenizer, train_records: list) -> None:
    """Raise the DataError training would raise when no training record has a token to
    learn from. Tokenizes records only until the first that has one: on usable data that
    is the first record, so a run can be refused before its directory exists at no cost."""
    dropped = 0
    for record in train_records:
        examples, _, gone = build_examples([record], tokenizer, config.seq_len)
        if examples:
            return
        dropped += gone
    raise _nothing_to_learn(config, dropped)


def load_datasets(config, tokenizer) -> Datasets:
    """Train and held-out examples for a RunConfig."""
    train_records, heldout_records = split_records(config)
    train, truncated, dropped = build_examples(train_records, tokenizer, config.seq_len)
    heldout, held_truncated, held_dropped = build_examples(heldout_records, tokenizer, config.seq_len)
    if not train:
        raise _nothing_to_learn(config, dropped)
    if config.packing:
        train = pack(train, config.seq_len)
    if config.eval_max_examples:
        heldout = heldout[: config.eval_max_examples]
    return Datasets(train, heldout, truncated + held_truncated, config.data, dropped, held_dropped)


# ---------------------------------------------------------------- batching

def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels; with packed examples, also
    position_ids that restart at each packed example (and run on through the padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(len(e.segments) > 1 for e in examples):
        positions = torch.empty((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            lengths = list(e.segments or (len(e.input_ids),))
            lengths[-1] += width - len(e.input_ids)   # the padding continues the last example
            positions[i] = torch.cat([torch.arange(n) for n in lengths])
        batch["position_ids"] = positions
    return batch


def decoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a decoder takes from a collated batch.

    No attention mask: batches are right-padded, so a real token never sees a
    pad (pads only follow it), and without a mask SDPA takes its causal path; no
    batch × seq² mask is built and saved in every block. Packed batches pass
    `position_ids` instead; transformers reads each restart as the start of a new
    sequence and masks attention to block-diagonal (a mask the planner counts).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"]}


class BatchStream:
    """Micro-batches in a seeded order that can be saved and resumed exactly.

    The order of epoch e is a permutation drawn from `seed + e`, so the
    position (epoch, cursor) is all a checkpoint needs to continue it.
    """

    def __init__(self, examples: list[Example], micro_batch: int, seed: int, pad_id: int):
        self.examples, self.micro_batch, self.seed, self.pad_id = examples, micro_batch, seed, pad_id
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> dict[str, torch.Tensor]:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        take = self._order[self.cursor:self.cursor + self.micro_batch]
        self.cursor += len(take)
        return collate([self.examples[i] for i in take], self.pad_id)

    def fingerprint(self) -> str:
        """What the position indexes into: `fingerprint(examples)`."""
        return fingerprint(self.examples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "examples": len(self.examples),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state["examples"] != len(self.examples):
            raise DataError(f"the data has {len(self.examples)} training examples but the checkpoint was "
                            f"made with {state['examples']}; resume needs the same ones: the same data file, "
                            f"split the same way (eval_fraction, seed; a version of lowmem other than the run's may "
                            f"split differently) and cut at the same seq_len")
        if state.get("fingerprint", self.fingerprint()) != self.fingerprint():   # older checkpoints: count only
            raise DataError(f"the training data changed since the checkpoint was made (same {len(self.examples)} "
                            f"examples, different tokens): the run would not continue exactly; restore the "
                            f"data it was started with, or start a new run")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
