"""Evaluation sets users bring: multiple choice (CEval-style CSV) and question answering (jsonl).

    my_mcq.csv    columns id, question, A, B, C, D, answer (a letter A-D): accuracy
    my_qa.jsonl   rows of any format `megaswift sft` reads whose last assistant turn is the reference
                  answer (e.g. {"query": ..., "response": ...}): ROUGE-L F1 (rouge-score) and BLEU (sacrebleu)

Multiple choice is scored two ways, as lm-eval-harness does for its MCQ tasks: against a local model by the
log-likelihood of each option letter after the prompt (no generation, no parsing), against a URL (an
OpenAI-compatible server) by generating and reading the first option letter of the reply.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from megaswift.data.sft.formats import SampleFormatError
from megaswift.serve.rendering import Prompt, prompt_from_row

LETTERS = ("A", "B", "C", "D")
MCQ_COLUMNS = ("id", "question", *LETTERS, "answer")
_FIRST_LETTER = re.compile(r"\b([ABCD])\b")


@dataclass
class MultipleChoice:
    id: str
    prompt: Prompt
    answer: str


@dataclass
class QuestionAnswer:
    where: str
    prompt: Prompt
    reference: str


def mcq_prompt(question: str, options: dict[str, str]) -> Prompt:
    lines = [question, *(f"{letter}. {options[letter]}" for letter in LETTERS),
             "Answer with the letter of the correct option."]
    return Prompt([{"role": "user", "content": "\n".join(lines)}], None)


def read_mcq(path: Path) -> list[MultipleChoice]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MCQ_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SampleFormatError(f"{path}:1", f"a header with the columns {list(MCQ_COLUMNS)}",
                                    f"{reader.fieldnames} (missing {missing})")
        items = []
        for line, row in enumerate(reader, start=2):
            answer = (row["answer"] or "").strip().upper()
            if answer not in LETTERS:
                raise SampleFormatError(f"{path}:{line}", "answer to be one of A, B, C, D", repr(row["answer"]))
            items.append(MultipleChoice(row["id"], mcq_prompt(row["question"], {k: row[k] for k in LETTERS}), answer))
    return items


def read_qa(path: Path) -> list[QuestionAnswer]:
    items = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise SampleFormatError(where, "a JSON object", f"invalid JSON ({err.msg})") from None
        prompt = prompt_from_row(row, where)
        if prompt.reference is None:
            raise SampleFormatError(where, "a reference answer (`response`, or a final assistant message)",
                                    f"keys {sorted(row)}")
        items.append(QuestionAnswer(where, prompt, prompt.reference))
    return items


def read_task(path: str | Path):
    """('mcq', items) for .csv, ('qa', items) for .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--tasks {path}: no such file (expected a .csv MCQ set or a .jsonl QA set)")
    if path.suffix == ".csv":
        return "mcq", read_mcq(path)
    if path.suffix == ".jsonl":
        return "qa", read_qa(path)
    raise ValueError(f"--tasks {path}: expected a .csv (multiple choice) or .jsonl (question answering) file, "
                     f"found {path.suffix!r}")


def letter_of(reply: str) -> str | None:
    """The option a generated reply picks: its first standalone letter A-D."""
    found = _FIRST_LETTER.search(reply.strip())
    return found.group(1) if found else None


def qa_scores(hypotheses: list[str], references: list[str]) -> dict:
    """ROUGE-L F1 (mean over rows) and corpus BLEU, both 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return {"rougeL_f1": round(100 * sum(rouge) / len(rouge), 2),
            "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2)}
