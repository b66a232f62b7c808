"""The demo's preference data: arithmetic questions in the capybara layout.

The preference is visible in one line of text: the chosen answer states the result
("The answer is 12."), the rejected answer hedges ("I am not sure, maybe 11."). The base model
the demo builds can produce both styles but prefers hedging, so DPO has something to change.

The shipped file recipes/data/arithmetic-capybara.jsonl is `python -m alignpress.demo.data`;
a test checks that it still equals what this module writes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
QUESTIONS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"]
# Answers in the chosen style match this; the recipe's eval.behaviour_pattern uses it.
CHOSEN_PATTERN = r"^The answer is \d+\.$"


def question(rng: random.Random) -> tuple[str, str, int, int]:
    op = rng.choice(list(OPS))
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    if op == "minus" and b > a:
        a, b = b, a
    return rng.choice(QUESTIONS).format(a=a, op=op, b=b), op, a, b


def confident(op: str, a: int, b: int) -> str:
    return f"The answer is {OPS[op](a, b)}."


def hedging(rng: random.Random, op: str, a: int, b: int) -> str:
    wrong = OPS[op](a, b) + rng.choice([-2, -1, 1, 2])
    return f"I am not sure, maybe {max(wrong, 0)}."


def _row(q: str, chosen: str, rejected: str, rating_c: float, rating_r: float, prior: list[dict] | None = None) -> dict:
    prior = prior or []
    conv_c = prior + [{"role": "user", "content": q}, {"role": "assistant", "content": chosen}]
    conv_r = prior + [{"role": "user", "content": q}, {"role": "assistant", "content": rejected}]
    turns = [{"input": m["content"], "output": n["content"]} for m, n in zip(prior[::2], prior[1::2])]
    return {
        "source": "alignpress-demo",
        "conversation": turns + [{"input": q, "output": chosen}],
        "original_response": rejected,
        "generation_prompt": [q],
        "raw_generation_responses": [chosen],
        "new_generations": [chosen],
        "prompt": q,
        "chosen": conv_c,
        "rejected": conv_r,
        "rating_chosen": rating_c,
        "rating_rejected": rating_r,
        "chosen_model": "demo-teacher",
        "rejected_model": "demo-student",
    }


def make_rows(n: int = 640, seed: int = 1234) -> list[dict]:
    """n clean pairs plus a few rows each filter in the demo recipe is meant to catch."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, op, a, b = question(rng)
        row = _row(q, confident(op, a, b), hedging(rng, op, a, b), rng.choice([4.5, 5.0]), rng.choice([1.0, 2.0, 2.5]))
        kind = i % 40
        if kind == 7:  # a low-rated "chosen": removed by the rating filter
            row["rating_chosen"] = 3.0
        elif kind == 13:  # a second turn: removed by max_messages
            pq, pop, pa, pb = question(rng)
            row = _row(q, confident(op, a, b), hedging(rng, op, a, b), 5.0, 1.0,
                       prior=[{"role": "user", "content": pq}, {"role": "assistant", "content": confident(pop, pa, pb)}])
        elif kind == 21:  # the same answer twice: removed by drop_identical
            row = _row(q, confident(op, a, b), confident(op, a, b), 5.0, 1.0)
        elif kind == 29 and rows:  # an exact repeat of the previous row: removed by drop_duplicates
            row = json.loads(json.dumps(rows[-1]))
        rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("recipes/data/arithmetic-capybara.jsonl")
    write(out, make_rows())
    print(f"wrote {out}")
