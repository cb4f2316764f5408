"""Writes the embedded dataset: short instruction tasks with one exact answer.

Each task is a rule a small model can learn from a few hundred examples
(capitalise, reverse, sort, count, compare, pick), asked in chat format. An
instruct model answers them at length ("Sure! The word in capitals is ...");
the exact-match metric rewards the short, exact answer, so a brief LoRA run
moves it, and the held-out loss on the answer tokens falls with it.

The split is fixed: held-out examples use words and numbers drawn from the
same pools but a separate random stream, and no held-out prompt appears in
the training file. Run `python -m lowmem.datasets.make_tasks` to rewrite both
files; the output is identical every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = """apple river candle garden silver mountain pencil window orange rabbit
yellow forest bottle planet butter circle dragon engine flower guitar hammer island
jacket kitten ladder marble needle ocean pepper quartz rocket saddle tiger umbrella
valley wallet yogurt zebra anchor basket cactus desert feather glacier harbor
lantern meadow nickel oyster parrot puzzle ribbon spider tunnel velvet walnut""".split()

ADJECTIVES = "happy sad bright dark quick slow loud quiet warm cold".split()
POSITIVE = ["I loved this movie", "The food was wonderful", "What a great day",
            "This book is excellent", "The service was fantastic", "I am very happy with it",
            "Such a beautiful song", "The hotel was perfect"]
NEGATIVE = ["I hated this movie", "The food was awful", "What a terrible day",
            "This book is boring", "The service was horrible", "I am very unhappy with it",
            "Such an ugly painting", "The hotel was dirty"]

SYSTEM = "Answer with the result only."


def _uppercase(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Write this word in capital letters: {w}", w.upper()


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    ns = rng.sample(range(1, 100), rng.randint(3, 4))
    return (f"Sort these numbers from smallest to largest: {', '.join(map(str, ns))}",
            ", ".join(map(str, sorted(ns))))


def _count_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 6)
    return f"How many words are in this sentence: {' '.join(rng.sample(WORDS, n))}", str(n)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def _even_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _first_letter(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"What is the first letter of the word {w}?", w[0]


def _last_word(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS + ADJECTIVES, rng.randint(3, 5))
    return f"What is the last word of this list: {' '.join(ws)}", ws[-1]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return f"Is this review positive or negative? \"{rng.choice(POSITIVE)}\"", "positive"
    return f"Is this review positive or negative? \"{rng.choice(NEGATIVE)}\"", "negative"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} plus {b}?", str(a + b)


TASKS = (_uppercase, _reverse_words, _sort_numbers, _count_words, _larger, _even_odd,
         _first_letter, _last_word, _sentiment, _add)


def make(n: int, seed: int, exclude: set[str] = frozenset(), unique: bool = False) -> list[dict]:
    """n examples cycling through the tasks; prompts in `exclude` are never used.

    Some tasks have few distinct prompts (one per word), so only the small
    held-out split asks for every prompt to be unique.
    """
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        task = TASKS[len(out) % len(TASKS)]
        prompt, answer = task(rng)
        if prompt in seen:
            continue
        if unique:
            seen.add(prompt)
        out.append({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": prompt},
                                 {"role": "assistant", "content": answer}]})
    return out


def main() -> None:
    import argparse

    argparse.ArgumentParser(description="Rewrite the embedded dataset (tasks-train.jsonl, "
                            "tasks-heldout.jsonl beside this file); the output is identical every time. "
                            "Takes no arguments.").parse_args()
    here = Path(__file__).parent
    heldout = make(80, seed=20261124, unique=True)
    train = make(1200, seed=7, exclude={r["messages"][1]["content"] for r in heldout})
    for name, records in (("tasks-train.jsonl", train), ("tasks-heldout.jsonl", heldout)):
        with open(here / name, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(records)} examples to {here / name}")


if __name__ == "__main__":
    main()
