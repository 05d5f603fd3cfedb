"""Fine-tune a tiny model on the generated tool-calling data with and without the agent loss scale,
and compare how often each gets the held-out tool call right (issue 4, after the SWIFT paper).

    .venv/bin/python examples/agent/compare_loss_scale.py            # ~15 min on 2 CPU cores

One command, every stage repeatable (fixed seeds, one thread per process, no sampling):
  1. dataset      make_dataset.py splits (train / held-out) into WORK/data
  2. tokenizer    the tiny BPE, also trained on the rendered training split so the tool schemas
                  in the system turn cost a few tokens instead of ~700 (see tiny_tokenizer.py)
  3. training     `megaswift sft` twice, identical but for --data.loss_scale default | agent:
                  same seed (so the same initial weights and row order), same steps, same rows
  4. export       `megaswift convert mcore2hf` of both final checkpoints
  5. generation   greedy `generate` of the assistant's first turn for each held-out prompt
                  (messages up to the user turn, with the tools)
  6. scoring      evaluate.py: tool-name accuracy and exact match of name + arguments, plus the
                  held-out loss on the reference tool-call tokens (teacher-forced, unweighted),
                  which moves before exact match does
  7. report       benchmarks/results/agent_loss_scale.json and a table on stdout

The training losses of the two runs are not comparable with each other: the agent run's loss is
sum(weight * ce) / tokens with tool-call tokens weighing 3.0. The held-out tool-call loss is.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402  (the scorer beside this file)
import make_dataset  # noqa: E402

LOSS_SCALES = ("default", "agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "agent_loss_scale",
                   help="scratch folder (wiped at the start: a leftover checkpoint would be resumed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "agent_loss_scale.json")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-length", type=int, default=160, help="longer samples are dropped (counted in the log)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine may be shared)")
    return p.parse_args(argv)


def model_overrides(args) -> dict:
    """A small Llama: heads of 32 dims, SwiGLU width 2x hidden, positions just covering a row.
    torch_dtype float32: the weights are trained and exported in fp32, and mcore2hf copies this field
    into config.json unchanged; the preset's bfloat16 would make its verification (and any
    dtype="auto" load) round the fp32 weights to bf16."""
    heads = max(args.hidden // 32, 1)
    return {"torch_dtype": "float32", "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": args.vocab,
            "max_position_embeddings": args.seq_length + args.max_new_tokens + 64}


def build_dataset(args, data_dir: Path) -> tuple[list[dict], list[dict]]:
    train, held_out = make_dataset.make_splits(args.train_samples, args.eval_samples, args.seed)
    make_dataset.write_jsonl(data_dir / "train.jsonl", train)
    make_dataset.write_jsonl(data_dir / "eval.jsonl", held_out)
    return train, held_out


def build_tokenizer(train: list[dict], vocab: int, out_dir: Path):
    """The tiny tokenizer, also trained on the training split as the chat template renders it (the
    template does not depend on the vocabulary, so the default tokenizer renders it)."""
    from megaswift.data.sft.formats import normalise_row
    from megaswift.data.tiny_tokenizer import build_tiny_tokenizer
    renderer = build_tiny_tokenizer()
    rendered = [renderer.apply_chat_template(normalise_row(row, "messages", f"train.jsonl:{i}")["messages"],
                                             tools=row["tools"], tokenize=False) for i, row in enumerate(train, 1)]
    return build_tiny_tokenizer(out_dir, vocab, extra_text=rendered, merge_across_words=True)


def megaswift(*argv: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "megaswift", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"expected `{' '.join(cmd)}` to succeed, it exited with {done.returncode}")


def train(args, loss_scale: str, work: Path) -> dict:
    run_dir = work / f"run_{loss_scale}"
    began = time.perf_counter()
    megaswift("sft", "--data.datasets", str(work / "data" / "train.jsonl"),
              "--data.tokenizer", str(work / "tokenizer"), "--data.seq_length", str(args.seq_length),
              "--data.loss_scale", loss_scale, "--data.loss_on", "all_assistant",
              "--data.cache_dir", str(work / "sft_cache"),
              "--model.preset", "tiny-llama", "--model.overrides", json.dumps(model_overrides(args)),
              "--train.seed", str(args.seed), "--train.train_iters", str(args.steps),
              "--train.global_batch_size", str(args.global_batch), "--train.micro_batch_size", str(args.micro_batch),
              "--train.lr", str(args.lr), "--train.min_lr", str(args.lr / 10),
              "--train.lr_warmup_iters", str(max(args.steps // 20, 1)), "--train.precision", "fp32",
              "--checkpoint.save", str(run_dir / "checkpoint"), "--logging.output_dir", str(run_dir),
              "--logging.log_interval", "1", "--logging.tensorboard", "false", "--logging.progress_bar", "false",
              threads=args.threads)
    train_seconds = time.perf_counter() - began
    megaswift("convert", "mcore2hf", str(run_dir / "checkpoint"), str(run_dir / "hf"), "--no-progress",
              threads=args.threads)
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"hf_dir": run_dir / "hf", "train_seconds": round(train_seconds, 1), "train_loss_first": losses[0],
            "train_loss_last": losses[-1], "train_loss_last10_mean": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def evaluate_model(hf_dir: Path, held_out: list[dict], max_new_tokens: int) -> tuple[dict, list[str]]:
    """Greedy first assistant turn per held-out prompt, scored; and the mean held-out loss of the
    reference turn's tokens (the prompt's tokens excluded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaswift.data.sft.formats import normalise_row
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    generated, expected, loss_sum, loss_tokens = [], [], 0.0, 0
    for sample in held_out:
        prompt, call = evaluate.expected_tool_call(sample)
        reference = normalise_row(sample, "messages", "eval.jsonl")["messages"][:len(prompt) + 1]
        head = tokenizer.apply_chat_template(prompt, tools=sample["tools"], add_generation_prompt=True,
                                             tokenize=False)
        full = tokenizer.apply_chat_template(reference, tools=sample["tools"], tokenize=False)
        full = full[:full.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]  # SFT trains no "\n" after it
        head_ids = tokenizer(head, add_special_tokens=False, return_tensors="pt")["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(head_ids, attention_mask=torch.ones_like(head_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        generated.append(tokenizer.decode(out[0, head_ids.shape[1]:], skip_special_tokens=True))
        expected.append(call)
        logits = model(full_ids).logits[0, :-1].float()
        targets = full_ids[0, 1:].clone()
        targets[:head_ids.shape[1] - 1] = -100  # score only the reference turn (its end marker included)
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        loss_tokens += int((targets != -100).sum())
    scores = evaluate.score(generated, expected)
    scores["heldout_call_loss"] = loss_sum / max(loss_tokens, 1)
    return scores, generated


def print_table(results: dict) -> None:
    cols = ("name_accuracy", "exact_match", "parse_failures", "heldout_call_loss", "train_loss_first",
            "train_loss_last")
    print(f"{'loss_scale':<11}" + "".join(f"{c:>19}" for c in cols))
    for name, row in results.items():
        print(f"{name:<11}" + "".join(f"{row[c]:>19.4g}" if isinstance(row[c], float) else f"{row[c]:>19}"
                                      for c in cols))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    train_rows, held_out = build_dataset(args, work / "data")
    build_tokenizer(train_rows, args.vocab, work / "tokenizer")
    results = {}
    for loss_scale in LOSS_SCALES:
        run = train(args, loss_scale, work)
        scores, generated = evaluate_model(run.pop("hf_dir"), held_out, args.max_new_tokens)
        (work / f"run_{loss_scale}" / "generations.jsonl").write_text(
            "".join(json.dumps({"generated": g}) + "\n" for g in generated))
        results[loss_scale] = {**scores, **run}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("work", "out")}
    report = {"settings": {**settings, "model": {"preset": "tiny-llama", **model_overrides(args)},
                           "loss_on": "all_assistant", "precision": "fp32", "processes": 1},
              "held_out_samples": len(held_out), "results": results,
              "wall_seconds": round(time.perf_counter() - began, 1),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"held-out samples {len(held_out)}, steps {args.steps}, wall {report['wall_seconds']} s -> {args.out}")
    return report


if __name__ == "__main__":
    main()
