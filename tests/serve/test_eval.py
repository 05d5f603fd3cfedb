"""`megaswift eval` on a local model: MCQ picks equal transformers' own next-token choice; QA scores."""
import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megaswift.cli.main import main
from megaswift.serve.eval_tasks import LETTERS, mcq_prompt
from megaswift.serve.loading import load_tokenizer

QUESTIONS = [("q1", "Which is a number?", ["cat", "7", "blue", "run"]),
             ("q2", "Which is a colour?", ["red", "dog", "sit", "3"]),
             ("q3", "Which is an animal?", ["green", "jump", "horse", "9"]),
             ("q4", "Which is a verb?", ["table", "swim", "pink", "4"])]


def _transformers_pick(model, tokenizer, question, options):
    """Independent of megaswift's rendering: apply_chat_template, one forward, the likeliest letter."""
    text = tokenizer.apply_chat_template(mcq_prompt(question, dict(zip(LETTERS, options))).messages,
                                         add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    letter_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    return LETTERS[int(torch.argmax(logits[letter_ids]))]


def test_mcq_and_qa_on_a_local_model(tiny_chat_model, tmp_path):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_chat_model), load_tokenizer(tiny_chat_model)
    picks = [_transformers_pick(model, tokenizer, q, opts) for _, q, opts in QUESTIONS]
    answers = picks[:3] + [next(letter for letter in LETTERS if letter != picks[3])]  # 3 of 4 right
    mcq = tmp_path / "my_mcq.csv"
    with mcq.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "question", *LETTERS, "answer"])
        writer.writerows([qid, q, *opts, answer] for (qid, q, opts), answer in zip(QUESTIONS, answers))
    qa = tmp_path / "my_qa.jsonl"
    qa.write_text(json.dumps({"query": "Say hello.", "response": "Hello there, friend!"}) + "\n" +
                  json.dumps({"messages": [{"role": "user", "content": "Say hello."},
                                           {"role": "assistant", "content": "Goodbye now."}]}) + "\n")
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(tiny_chat_model), "--tasks", f"{mcq},{qa}", "--output", str(out),
                 "--max-new-tokens", "12"]) == 0
    results = json.loads(out.read_text())["tasks"]
    assert results["my_mcq.csv"] == {"kind": "mcq", "n": 4, "correct": 3, "accuracy": 75.0}
    # the taught greeting is exactly the first reference and shares no word with the second
    assert results["my_qa.jsonl"]["rougeL_f1"] == 50.0
    import sacrebleu
    expected_bleu = sacrebleu.corpus_bleu(["Hello there, friend!"] * 2, [["Hello there, friend!", "Goodbye now."]])
    assert results["my_qa.jsonl"]["bleu"] == round(expected_bleu.score, 2)


def test_bad_mcq_answer_names_the_line(tiny_chat_model, tmp_path, capsys):
    mcq = tmp_path / "bad.csv"
    mcq.write_text("id,question,A,B,C,D,answer\nq1,Which?,a,b,c,d,E\n")
    assert main(["eval", "--model", str(tiny_chat_model), "--tasks", str(mcq),
                 "--output", str(tmp_path / "r.json")]) == 1
    assert f"{mcq}:2" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--tasks", "x.csv"], ["--model", "m", "--url", "http://x/v1", "--tasks", "x.csv"]])
def test_model_or_url(args, capsys):
    assert main(["eval", *args]) == 1
    assert "exactly one of --model" in capsys.readouterr().err
