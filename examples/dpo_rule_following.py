"""A measured effect of `megaswift rlhf`: DPO from an SFT checkpoint teaches a checkable rule.

The rule: asked "What comes after W?", the answer names the word that follows W in a fixed list
("After W comes X."). The SFT data shows the answer format, but only half of its answers follow the
rule (the other half name one other word), so the SFT model learns the format, not the rule. The
preference data pairs the rule-following answer (chosen) with the rule-breaking one (rejected); DPO
adds the NLL of the chosen answers (rpo_alpha), which keeps their likelihood from collapsing. Held
out: the same words asked in phrasings never trained on.

Steps (each the real command in a child process, on the tiny offline tokenizer, from random init):
    1. megaswift sft    on the mixed answers                    -> sft/
    2. megaswift rlhf   DPO (sigmoid + rpo_alpha) from sft/, frozen-copy reference -> dpo/
    3. both exported with mcore2hf and scored with transformers on the held-out prompts:
       preference accuracy  share of held-out pairs whose chosen answer has the higher log-probability
       rule compliance      share of greedy answers (max 16 new tokens) naming the right word
       rule consistency     share of greedy answers "After X comes Y" whose Y follows X (the rule held,
                            whichever word X the model read from the unseen phrasing)

    python examples/dpo_rule_following.py [--out runs/dpo_rule] [--sft-steps 200] [--dpo-steps 150]

Prints one JSON line with both models' scores (and writes it to OUT/result.json).
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
TRAIN_PHRASINGS = ["What comes after {w}?", "Which word follows {w}?", "Name the word after {w}."]
HELD_OUT_PHRASINGS = ["Tell me what comes right after {w}.", "After {w}, which word is next?"]


def answer(word: str, named: str) -> str:
    return f"After {word} comes {named}."


def next_word(i: int) -> str:
    return WORDS[(i + 1) % len(WORDS)]


def wrong_word(i: int) -> str:
    """The one rule-breaking answer to W (always the same, so SFT sees it as often as the right one)."""
    return WORDS[(i + 3) % len(WORDS)]


def make_data(folder: Path) -> dict:
    sft, prefs, held_out = [], [], []
    for i, word in enumerate(WORDS):
        for k, phrasing in enumerate(TRAIN_PHRASINGS * 4):
            question = phrasing.format(w=word)
            named = next_word(i) if k % 2 == 0 else wrong_word(i)
            sft.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer(word, named)}]})
            prefs.append({"prompt": [{"role": "user", "content": question}],
                          "chosen": [{"role": "assistant", "content": answer(word, next_word(i))}],
                          "rejected": [{"role": "assistant", "content": answer(word, wrong_word(i))}]})
        for k, phrasing in enumerate(HELD_OUT_PHRASINGS):
            held_out.append({"question": phrasing.format(w=word), "word": word, "right": next_word(i),
                             "wrong": wrong_word(i)})
    paths = {name: folder / f"{name}.jsonl" for name in ("sft", "prefs")}
    for name, rows in (("sft", sft), ("prefs", prefs)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**paths, "held_out": held_out}


def megaswift(command: str, **flags) -> None:
    argv = [sys.executable, "-m", "megaswift", command,
            *[item for key, value in flags.items() for item in (f"--{key}", str(value))]]
    subprocess.run(argv, check=True, cwd=REPO)


def score(hf_dir: Path, held_out: list[dict]) -> dict:
    """Preference accuracy and greedy rule compliance of an exported model on the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def token_ids(messages: list[dict], **kwargs) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"])

    def answer_logp(question: str, text: str) -> float:
        prompt = token_ids([{"role": "user", "content": question}], add_generation_prompt=True)
        full = token_ids([{"role": "user", "content": question}, {"role": "assistant", "content": text}])
        ids = torch.tensor([full])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        picked = logps.gather(-1, targets[:, None])[:, 0]
        return float(picked[len(prompt) - 1:].sum())

    preferred = compliant = consistent = 0
    for row in held_out:
        preferred += answer_logp(row["question"], answer(row["word"], row["right"])) > \
            answer_logp(row["question"], answer(row["word"], row["wrong"]))
        prompt = torch.tensor([token_ids([{"role": "user", "content": row["question"]}], add_generation_prompt=True)])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                 do_sample=False)
        text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        compliant += f"comes {row['right']}" in text
        said = re.search(r"After (\w+) comes (\w+)", text)
        consistent += bool(said and said[1] in WORDS and said[2] == next_word(WORDS.index(said[1])))
    n = len(held_out)
    return {"preference_accuracy": preferred / n, "rule_compliance": compliant / n, "rule_consistency": consistent / n}


def train(args, out: Path, data: dict, common: dict) -> None:
    megaswift("sft", **common, **{"data.datasets": data["sft"], "data.seq_length": 96, "train.lr": 3e-3,
                                  "train.min_lr": 3e-3, "train.train_iters": args.sft_steps,
                                  "checkpoint.save": out / "sft"})
    megaswift("rlhf", **common, **{"data.datasets": data["prefs"], "data.seq_length": 192, "train.lr": 2e-4,
                                   "train.min_lr": 2e-4, "train.train_iters": args.dpo_steps,
                                   "rlhf.rpo_alpha": args.rpo_alpha,
                                   "rlhf.type": "dpo", "rlhf.loss": "sigmoid", "rlhf.beta": args.beta,
                                   "checkpoint.load": out / "sft", "checkpoint.finetune": "true",
                                   "checkpoint.save": out / "dpo"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dpo_rule"))
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rpo-alpha", type=float, default=1.0)
    parser.add_argument("--score-only", action="store_true", help="score the checkpoints already in --out")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from converters import mcore2hf
    from megaswift.data.tiny_tokenizer import build_tiny_tokenizer
    tokenizer = out / "tokenizer"
    if not tokenizer.is_dir():
        tokenizer.mkdir()
        build_tiny_tokenizer(tokenizer)
    data = make_data(out)
    common = {"model.preset": "tiny-llama", "data.tokenizer": tokenizer, "data.loss_on": "last_round",
              "train.precision": "fp32", "train.micro_batch_size": 8, "train.global_batch_size": 16,
              "train.lr_decay_style": "constant", "train.lr_warmup_iters": 5, "logging.progress_bar": "false",
              "logging.tensorboard": "false", "logging.log_interval": 20}
    if not args.score_only:
        train(args, out, data, common)
    result = {}
    for name in ("sft", "dpo"):
        exported = out / f"{name}_hf"
        mcore2hf(out / name, exported, verify=False, progress=False, overwrite=True)
        result[name] = score(exported, data["held_out"])
    result["held_out_pairs"] = len(data["held_out"])
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
