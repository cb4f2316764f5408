import json
import re

import pytest

from lowmem.config import RunConfig
from lowmem.data import (IGNORE, BatchStream, build_examples, load_datasets, pack, read_records,
                         split_records, tokenize_chat)
from lowmem.errors import DataError
from tests.conftest import write_jsonl


def _learned_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])


def test_chat_loss_is_only_on_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome"}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert len(ids) == len(labels)
    assert _learned_text(tokenizer, ids, labels) == "Paris<|im_end|>\nRome<|im_end|>\n"


# A Qwen3-like template: only the answer after the last user turn gets a reasoning block, so an
# earlier answer renders otherwise alone than inside the whole conversation.
QWEN3_LIKE = """{%- set ns = namespace(last=0) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}
{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}{%- for m in messages -%}
{%- if m.role == 'assistant' and loop.index0 > ns.last -%}
{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}
{%- else -%}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"""

# A Mistral-like template: the system prompt goes into the last user turn.
MISTRAL_LIKE = """{%- if messages[0].role == 'system' %}{%- set sys = messages[0].content %}
{%- set msgs = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set msgs = messages %}{%- endif %}
{%- set ns = namespace(last=0) %}{%- for m in msgs %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}
{%- endif %}{%- endfor %}<s>{%- for m in msgs %}{%- if m.role == 'user' %}
{%- if loop.index0 == ns.last and sys %}[INST] {{ sys }}\n\n{{ m.content }}[/INST]
{%- else %}[INST] {{ m.content }}[/INST]{%- endif %}{%- else %} {{ m.content }}</s>{%- endif %}{%- endfor %}"""


@pytest.mark.parametrize("template, system, answers, learned", [
    (QWEN3_LIKE, [], ("4", "Paris"), "4<|im_end|>\n<think>\n\n</think>\n\nParis<|im_end|>\n"),
    (QWEN3_LIKE, [], ("start", "end"), "start<|im_end|>\n<think>\n\n</think>\n\nend<|im_end|>\n"),
    (QWEN3_LIKE, [{"role": "system", "content": "Say 4 to 4."}], ("4", "Paris"),
     "4<|im_end|>\n<think>\n\n</think>\n\nParis<|im_end|>\n"),
    (MISTRAL_LIKE, [{"role": "system", "content": "Be terse."}], ("4", "Paris"), "4</s> Paris</s>"),
    (MISTRAL_LIKE, [{"role": "system", "content": "Be terse."}], ("Four", "Paris"), " Four</s> Paris</s>"),
    (MISTRAL_LIKE, [{"role": "system", "content": "Answer Y or N."}], ("N", "Y"), " N</s> Y</s>"),
], ids=["qwen3-like", "qwen3-like-marker-words", "qwen3-like-answer-in-system", "mistral-like",
        "mistral-like-word", "mistral-like-letter-in-marker"])
def test_answers_are_found_where_a_template_renders_earlier_turns_otherwise(tokenizer, monkeypatch, template,
                                                                            system, answers, learned):
    """Rendered alone, an earlier answer is not a prefix of the whole conversation; it is found where
    the whole renders a mark in its place. Taken from the renderings' lengths, these learned the next
    user turn's tokens (Qwen3-like) or the prompt and not the first answer (Mistral-like); found by
    searching for its text, an answer matched inside a marker ("N" in [/INST], "start" in
    <|im_start|>), the system prompt or the user's turn, and lost a first token that begins with
    the template's space (" Four")."""
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = system + [{"role": "user", "content": "4"}, {"role": "assistant", "content": answers[0]},
                         {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": answers[1]}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert _learned_text(tokenizer, ids, labels) == learned
    first = next(i for i, l in enumerate(labels) if l != IGNORE)
    assert tokenizer.decode(ids[:first]).endswith(("assistant\n", "[/INST]", "[/INST] "))


def test_a_chat_template_that_refuses_a_conversation_names_the_record(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{%- for m in messages %}{%- if m.role == 'system' %}"
                        "{{ raise_exception('System role not supported') }}{%- endif %}{{ m.content }}{%- endfor %}")
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    with pytest.raises(DataError, match=r"s.jsonl: line 2: the model's chat template refused this conversation: "
                                        r"System role not supported"):
        build_examples(read_records(path), tokenizer, 256)


def test_an_empty_answer_to_learn_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Hi", "completion": " "}])
    with pytest.raises(DataError, match=r"e.jsonl: line 2: an assistant answer to learn is empty"):
        read_records(path)
    unlearned = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "train": False},
                 {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}]
    assert read_records(write_jsonl(tmp_path / "ok.jsonl", [{"messages": unlearned}])) == [(unlearned, None)]


def test_instruction_records_become_a_user_turn_and_an_answer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    (examples, _, _) = build_examples(read_records(path), tokenizer, 256)
    ex = examples[0]
    assert _learned_text(tokenizer, ex.input_ids, ex.labels) == "5<|im_end|>\n"
    assert ex.prompt[-1] == {"role": "user", "content": "Add\n\n2 and 3"} and ex.answer == "5"


def test_text_is_learned_everywhere_and_long_text_is_cut_not_dropped(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("word " * 100)
    examples, truncated, dropped = build_examples(read_records(path), tokenizer, 32)
    assert truncated == dropped == 0
    assert all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in examples)
    assert sum(len(e.input_ids) for e in examples) == len(tokenizer("word " * 100)["input_ids"]) + 1


def test_long_chat_is_truncated_and_counted_and_one_with_no_answer_left_is_dropped_and_counted(
        tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "x " * 20}, {"role": "assistant", "content": "ok " * 80}]},
        {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    examples, truncated, dropped = build_examples(read_records(path), tokenizer, 64)
    assert (len(examples), truncated, dropped) == (2, 1, 1)
    assert max(len(e.input_ids) for e in examples) <= 64


@pytest.mark.parametrize("line, message", [
    ('{"messages": [}', r"line 2: malformed JSON"),
    ('[1, 2]', r"line 2: expected a JSON object"),
    ('{"prompt": "x"}', r"line 2: expected a record with 'messages', 'instruction'/'output', 'conversations', "
                        r"'prompt'/'completion' or 'text', got keys \['prompt'\]"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"line 2: each message needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"line 2: no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     r"line 2: the conversation opens with the assistant"),
    ('{"instruction": null, "output": "x"}', r"line 2: an instruction record needs 'instruction' as text"),
    ('{"instruction": "a"}', r"line 2: an instruction record needs 'output' \(text\), and this one has none"),
    ('{"instruction": "a", "output": " "}', r"line 2: an assistant answer to learn is empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"]}',
     r"line 2: malformed JSON \(Expecting ',' delimiter; column \d+\)$"),
    ('{"instruction": "a", "input": 123, "output": "x"}', r"line 2: .*needs 'input' as text \(or leave it out\)"),
    ('{"conversations": []}', r"line 2: 'conversations' must be a non-empty list of messages, got \[\]"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}',
     r'line 2: unknown ShareGPT speaker \'from\': "robot"; expected one of system, human, user, gpt, assistant, '
     r"chatgpt, bing, bard"),
    ('{"conversations": [{"from": "human", "value": 7}]}', r'line 2: each ShareGPT turn needs \'value\' as text, '
                                                          r'got {"from": "human", "value": 7}'),
    ('{"conversations": ["hi"]}', r"line 2: each turn in 'conversations' needs 'from' and 'value' \(or 'role'"),
    ('{"conversations": [{"role": "robot", "content": "x"}]}', r"line 2: each message needs a role"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', r"line 2: no assistant message"),
    ('{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}',
     r"line 2: the conversation opens with the assistant"),
    ('{"prompt": "x", "completion": 5}',
     r"line 2: a prompt/completion record needs 'completion' as text or as a list of messages, got 5"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}',
     r"line 2: 'prompt' and 'completion' must be both text or both lists of messages, got a list and text"),
    ('{"prompt": [], "completion": [{"role": "assistant", "content": "y"}]}',
     r"line 2: 'prompt' must be a non-empty list of messages"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}',
     r"line 2: the messages in 'completion' must be assistant turns \(the prompt's go in 'prompt'\), "
     r'got {"role": "user", "content": "y"}'),
    ('{"prompt": [{"role": "robot", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}]}',
     r"line 2: each message needs a role"),
    ('{"prompt": [{"role": "assistant", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}]}',
     r"line 2: the conversation opens with the assistant"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl: {message}"):
        read_records(path)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome"}]
SHAREGPT = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris"}, {"role": "user", "content": "And Italy?"},   # a chat turn, mixed in
            {"from": "chatgpt", "value": "Rome"}]


@pytest.mark.parametrize("record, chat", [
    ({"prompt": "Capital of France?", "completion": "Paris"}, CHAT[1:3]),
    ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, CHAT[:3]),
    ({"prompt": CHAT[:4], "completion": CHAT[4:]}, CHAT[:2] + [{**CHAT[2], "train": False}] + CHAT[3:]),
    ({"prompt": CHAT[:2], "completion": [CHAT[2], {"role": "assistant", "content": "Rome"}]},
     CHAT[:3] + [{"role": "assistant", "content": "Rome"}]),
    ({"conversations": SHAREGPT}, CHAT),
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "bing", "value": "Yo"},
                        {"from": "human", "value": "Hi?"}, {"from": "bard", "value": "Yo!"},
                        {"from": "user", "value": "Hi!"}, {"from": "assistant", "value": "Yo."}]},
     [{"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "Yo"), ("user", "Hi?"),
                                            ("assistant", "Yo!"), ("user", "Hi!"), ("assistant", "Yo."))]),
    ({"system": "Be brief.", "conversations": [{"from": "Human", "value": "Capital of France?"},
                                               {"from": "GPT", "value": "Paris"}]}, CHAT[:3]),
], ids=["prompt-completion", "conversational", "conversational-multi-turn", "two-completion-messages",
        "sharegpt", "sharegpt-speaker-names", "sharegpt-system-beside-and-capitals"])
def test_other_layouts_give_the_examples_of_the_same_chat(tmp_path, tokenizer, record, chat):
    layout = build_examples(read_records(write_jsonl(tmp_path / "layout.jsonl", [record])), tokenizer, 256)
    same = build_examples(read_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])), tokenizer, 256)
    assert layout == same
    (ex,), _, _ = layout
    learned = "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant" and m.get("train", 1))
    assert _learned_text(tokenizer, ex.input_ids, ex.labels) == learned
    assert ex.answer == chat[-1]["content"]
    assert [(m["role"], m["content"]) for m in ex.prompt] == [(m["role"], m["content"]) for m in chat[:-1]]


def test_an_assistant_turn_marked_train_false_is_context_not_loss(tmp_path, tokenizer):
    marked = CHAT[:2] + [{**CHAT[2], "train": False}] + CHAT[3:]
    (ex,), _, _ = build_examples(read_records(write_jsonl(tmp_path / "m.jsonl", [{"messages": marked}])),
                                 tokenizer, 256)
    (plain,), _, _ = build_examples(read_records(write_jsonl(tmp_path / "p.jsonl", [{"messages": CHAT}])),
                                    tokenizer, 256)
    assert ex.input_ids == plain.input_ids                       # the same text, "train" is not rendered
    assert _learned_text(tokenizer, ex.input_ids, ex.labels) == "Rome<|im_end|>\n"
    bad = [{"messages": CHAT[:2] + [{**CHAT[2], "train": "no"}]},
           {"messages": CHAT[:2] + [{**CHAT[2], "train": False}]}]
    for record, message in zip(bad, ["a message's 'train' must be true or false, got \"no\"",
                                     'every assistant message has "train": false, so nothing to learn from']):
        with pytest.raises(DataError, match=re.escape(f"bad.jsonl: line 1: {message}")):
            read_records(write_jsonl(tmp_path / "bad.jsonl", [record]))


def test_a_record_with_several_layouts_keys_is_read_as_the_first_layout_and_text_as_the_last(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    records = [
        {"messages": chat, "instruction": "i", "output": "o", "text": "t"},
        {"instruction": "q", "output": "a", "conversations": [{"from": "human", "value": "x"}], "text": "t"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "prompt": "x", "completion": "y"},
        {"prompt": "q", "completion": "a", "text": "t"},
        {"text": "t", "prompt": "a prompt alone is not a layout", "id": 7, "source": "web"},
    ]
    assert read_records(write_jsonl(tmp_path / "mixed.jsonl", records)) == [(chat, None)] * 4 + [(None, "t")]


def test_a_long_value_in_an_error_is_cut_short(tmp_path):
    record = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "x" * 5000}]}
    with pytest.raises(DataError, match=r'long.jsonl: line 1: .*got {"role": "user", "content": "x+\.\.\.$') as e:
        read_records(write_jsonl(tmp_path / "long.jsonl", [record]))
    assert len(str(e.value)) < len(str(tmp_path)) + 200


def test_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_embedded_dataset_has_a_fixed_disjoint_heldout_split(tokenizer):
    data = load_datasets(RunConfig(), tokenizer)
    assert len(data.train) == 1200 and len(data.heldout) == 80
    train_prompts = {e.prompt[-1]["content"] for e in data.train}
    assert not train_prompts & {e.prompt[-1]["content"] for e in data.heldout}
    assert all(e.answer for e in data.heldout)


def test_user_data_without_eval_file_holds_out_a_fixed_share(tmp_path, tokenizer, tiny_chat_data):
    config = RunConfig(data=str(tiny_chat_data), eval_fraction=0.25)
    a, b = load_datasets(config, tokenizer), load_datasets(config, tokenizer)
    assert len(a.heldout) == 6 and len(a.train) == 18
    assert [e.input_ids for e in a.heldout] == [e.input_ids for e in b.heldout]


def test_packing_fills_sequences_without_exceeding_seq_len(tokenizer, tiny_chat_data):
    examples, _, _ = build_examples(read_records(tiny_chat_data), tokenizer, 128)
    packed = pack(examples, 128)
    assert len(packed) < len(examples)
    assert all(len(p.input_ids) <= 128 for p in packed)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)


def test_packed_examples_restart_their_positions_and_do_not_predict_across_a_boundary():
    from lowmem.data import Example, collate

    a, b, c = (Example(tuple(range(10 * k, 10 * k + n)), tuple(range(10 * k, 10 * k + n))) for k, n in
               ((1, 3), (2, 4), (3, 5)))
    packed = pack([a, b, c], 8)
    assert [p.segments for p in packed] == [(3, 4), (5,)]
    assert packed[0].input_ids == a.input_ids + b.input_ids
    # b's first token is no target: nothing of b comes before it, as when b trains alone.
    assert packed[0].labels == (IGNORE, 11, 12, IGNORE, 21, 22, 23)
    batch = collate(packed, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert "position_ids" not in collate([a, b], pad_id=0)   # unpacked: causal, no positions needed


def test_batch_stream_resumes_at_the_same_position(tokenizer, tiny_chat_data):
    examples, _, _ = build_examples(read_records(tiny_chat_data), tokenizer, 64)
    first = BatchStream(examples, 5, seed=3, pad_id=0)
    for _ in range(7):  # crosses an epoch boundary (24 examples, 5 per batch)
        first.next()
    state = json.loads(json.dumps(first.state_dict()))
    second = BatchStream(examples, 5, seed=3, pad_id=0)
    second.load_state_dict(state)
    for _ in range(4):
        assert first.next()["input_ids"].tolist() == second.next()["input_ids"].tolist()


def test_resume_with_different_data_is_refused(tokenizer, tiny_chat_data):
    examples, _, _ = build_examples(read_records(tiny_chat_data), tokenizer, 64)
    state = BatchStream(examples, 4, 0, 0).state_dict()
    with pytest.raises(DataError, match=r"has 23 training examples but the checkpoint was made with 24; resume "
                                        r"needs the same ones: the same data file, split the same way"):
        BatchStream(examples[:-1], 4, 0, 0).load_state_dict(state)


def test_resuming_on_changed_data_of_the_same_size_is_refused():
    from lowmem.data import BatchStream, Example
    from lowmem.errors import DataError

    examples = [Example((i, i + 1), (i, i + 1)) for i in range(6)]
    stream = BatchStream(examples, 2, 0, 0)
    stream.next()
    state = stream.state_dict()
    BatchStream(list(examples), 2, 0, 0).load_state_dict(state)
    changed = examples[:5] + [Example((9, 9), (9, 9))]
    with pytest.raises(DataError, match="training data changed"):
        BatchStream(changed, 2, 0, 0).load_state_dict(state)
    BatchStream(changed, 2, 0, 0).load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})


def test_data_that_is_not_utf8_or_is_a_directory_is_a_one_line_error(tmp_path):
    from lowmem.data import read_records
    from lowmem.errors import DataError

    for name in ("x.jsonl", "x.txt"):
        (tmp_path / name).write_bytes('{"text": "a"}\n{"text": "b"}\n'.encode() + "hé".encode("latin-1"))
        with pytest.raises(DataError, match=f"{name}: line 3: not UTF-8 text"):
            read_records(tmp_path / name)
    with pytest.raises(DataError, match="is a directory"):
        read_records(tmp_path)


def test_a_byte_order_mark_a_json_list_and_an_upper_case_suffix_are_read(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello there")
    (tmp_path / "list.json").write_text(json.dumps([record, {"text": "plain"}], indent=2))
    (tmp_path / "UPPER.JSONL").write_text(json.dumps(record) + "\n")
    assert read_records(tmp_path / "bom.jsonl") == read_records(tmp_path / "UPPER.JSONL") == [
        (record["messages"], None)]
    assert read_records(tmp_path / "bom.txt") == [(None, "Hello there")]
    assert read_records(tmp_path / "list.json") == [(record["messages"], None), (None, "plain")]
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"prompt": 1}]')
    with pytest.raises(DataError, match=r"bad.json: record 2: expected a record with 'messages'"):
        read_records(tmp_path / "bad.json")


def test_a_json_file_holding_one_object_says_what_a_json_file_holds(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "a"}]}, indent=1))
    with pytest.raises(DataError, match=r"wrapped.json: holds one JSON object \(keys \['data'\]\), not a list; a "
                                        r".json file holds a list of records"):
        read_records(tmp_path / "wrapped.json")
    (tmp_path / "one.json").write_text(json.dumps({"text": "a"}))          # a lone record: surely not the dataset
    with pytest.raises(DataError, match=r"one.json: holds one JSON object \(keys \['text'\]\), not a list; .*"
                                        r"\(or name it .jsonl, one record per line\)"):
        read_records(tmp_path / "one.json")
    (tmp_path / "lines.json").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    assert read_records(tmp_path / "lines.json") == [(None, "a"), (None, "b")]


def test_a_txt_file_holds_out_its_tail_and_paths_may_start_with_home(tmp_path, tokenizer, monkeypatch):
    """A .txt file is one record, so a split of records held out nothing: its last lines are held out."""
    lines = [f"line {i} of the corpus, with some words." for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    train, heldout = split_records(RunConfig(data="~/corpus.txt", eval_fraction=0.1))
    (_, kept), = train
    (_, held), = heldout
    assert kept + held == (tmp_path / "corpus.txt").read_text()
    assert held.startswith("line 180 of") and kept.endswith("line 179 of the corpus, with some words.\n")
    data = load_datasets(RunConfig(data="~/corpus.txt", eval_fraction=0.1, seq_len=64), tokenizer)
    assert data.heldout and data.train
    assert split_records(RunConfig(data="~/corpus.txt", eval_fraction=0.0))[1] == []
    (tmp_path / "novel.txt").write_text("My Novel\n" + "word " * 2000)   # a title over one paragraph
    (_, kept), = split_records(RunConfig(data=str(tmp_path / "novel.txt"), eval_fraction=0.1))[0]
    assert 0.85 < len(kept) / len((tmp_path / "novel.txt").read_text()) < 0.95     # cut at a space, not the title
    (tmp_path / "word.txt").write_text("word")             # nothing to cut at: it all trains
    assert split_records(RunConfig(data=str(tmp_path / "word.txt")))[1] == []
    assert split_records(RunConfig(data=str(tmp_path / "word.txt"), eval_data="~/corpus.txt"))[1][0][1] == (
        tmp_path / "corpus.txt").read_text()


def test_without_a_chat_template_an_answer_ends_with_the_learned_eos(tokenizer, monkeypatch):
    """A base model learns to stop only if the end of an answer is in what it learns."""
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ids, labels = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}])
    learned = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tokenizer.eos_token_id in learned
    assert _learned_text(tokenizer, ids, labels).startswith("Hello" + tokenizer.eos_token)

