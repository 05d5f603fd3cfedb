"""A generated CEval-style multiple-choice set whose answers follow a rule a tiny model learns in seconds.

Each question names one of twelve key words; the key word alone decides the correct letter (three key words per
letter, so the answer is never a constant), and the four options are filler words drawn at random. A model that
never saw the rule scores about chance (25%); one fine-tuned on the training half learns the key word -> letter
table and applies it to the held-out half, whose rows (filler, options, wording) are different. It is the smallest
set on which "fine-tuning helped" can be measured end to end in CI: `megaswift sft` on the training half rendered
as chat, then `megaswift eval --tasks test.csv`.

    python examples/mcq_lookup_set.py --out mcq/       # mcq/train.csv, mcq/train.jsonl, mcq/test.csv

train.jsonl holds the training half as chat rows (user: question + options, assistant: the letter), rendered by
`megaswift.serve.eval_tasks.mcq_prompt`, the same prompt `megaswift eval` scores, so training and evaluation see
identical text.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from megaswift.serve.eval_tasks import LETTERS, MCQ_COLUMNS, mcq_prompt

# key word -> correct letter; single tokens in the tiny tokenizer (megaswift/data/tiny_tokenizer.py)
KEY_LETTERS = {"list": "A", "class": "A", "value": "A",
               "object": "B", "type": "B", "name": "B",
               "key": "C", "string": "C", "method": "C",
               "module": "D", "function": "D", "number": "D"}
FILLER = ("red green blue small large quick slow north south east west river stone cloud paper glass "
          "apple bread water light night table chair green window garden winter summer").split()
WORDINGS = ("Which option does the word {key} point to?", "Pick the option for {key}.",
            "The word is {key}. Which option is it?")


def make_rows(count: int, seed: int) -> list[dict]:
    """`count` rows (id, question, A-D, answer); every key word appears equally often."""
    rng = random.Random(seed)
    keys = [list(KEY_LETTERS)[i % len(KEY_LETTERS)] for i in range(count)]
    rng.shuffle(keys)
    rows = []
    for i, key in enumerate(keys):
        options = rng.sample(FILLER, len(LETTERS))
        question = rng.choice(WORDINGS).format(key=key)
        rows.append({"id": f"q{i}", "question": question, **dict(zip(LETTERS, options)), "answer": KEY_LETTERS[key]})
    return rows


def chat_row(row: dict) -> dict:
    """The training form of an MCQ row: the prompt `megaswift eval` scores, answered by the letter."""
    prompt = mcq_prompt(row["question"], {letter: row[letter] for letter in LETTERS})
    return {"messages": [*prompt.messages, {"role": "assistant", "content": row["answer"]}]}


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MCQ_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_sets(out_dir: str | Path, train: int = 96, test: int = 48, seed: int = 0) -> dict[str, Path]:
    """{"train_csv", "train_chat", "test_csv"}: two halves with different rows (different seeds and filler)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = make_rows(train, seed), make_rows(test, seed + 1)
    for r in test_rows:
        r["id"] = "t" + r["id"][1:]
    chat = out / "train.jsonl"
    chat.write_text("".join(json.dumps(chat_row(r)) + "\n" for r in train_rows), encoding="utf-8")
    return {"train_csv": write_csv(train_rows, out / "train.csv"), "train_chat": chat,
            "test_csv": write_csv(test_rows, out / "test.csv")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.csv, train.jsonl and test.csv")
    parser.add_argument("--train", type=int, default=96, help="training rows")
    parser.add_argument("--test", type=int, default=48, help="held-out rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_sets(args.out, args.train, args.test, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
