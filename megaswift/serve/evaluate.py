"""Run evaluation sets against a local model (log-likelihoods, generate) or an OpenAI-compatible URL."""
from __future__ import annotations

import json
from pathlib import Path

from megaswift.serve.engine import GenerationRequest, Generator, Sampling
from megaswift.serve.eval_tasks import LETTERS, letter_of, qa_scores, read_task
from megaswift.serve.loading import LoadedModel
from megaswift.serve.rendering import ChatRenderer


class LocalModel:
    def __init__(self, loaded: LoadedModel, adapter: str | None, batch_size: int = 8):
        self.loaded, self.adapter, self.batch_size = loaded, adapter, batch_size
        self.renderer, self.generator = ChatRenderer(loaded.tokenizer), Generator(loaded)

    def pick_letters(self, prompts) -> list[str]:
        """The option letter with the highest log-likelihood after each prompt (letters are scored as the
        tokens training would see after the generation prompt)."""
        import torch

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        letters = [self.renderer.token_ids(letter) for letter in LETTERS]
        extra = {"adapter_names": [self.adapter or "__base__"] * len(LETTERS)} if self.loaded.adapters else {}
        picks = []
        for prompt in prompts:
            ids = self.renderer.prompt_ids(prompt)
            rows = [ids + letter for letter in letters]
            width = max(map(len, rows))
            batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            with torch.inference_mode():
                logprobs = model(input_ids=batch, attention_mask=mask, **extra).logits.float().log_softmax(-1)
            scores = [sum(logprobs[r, len(ids) - 1 + k, token].item() for k, token in enumerate(letter))
                      for r, letter in enumerate(letters)]
            picks.append(LETTERS[max(range(len(LETTERS)), key=scores.__getitem__)])
        return picks

    def answer(self, prompts, max_new_tokens: int) -> list[str]:
        texts = []
        for first in range(0, len(prompts), self.batch_size):
            requests = [GenerationRequest(self.renderer.prompt_ids(p), max_new_tokens, Sampling(), (), self.adapter)
                        for p in prompts[first:first + self.batch_size]]
            texts += [result.text for result in self.generator.generate(requests)]
        return texts


class RemoteModel:
    """Any OpenAI-compatible server (a `megaswift deploy` included), through the official client."""

    def __init__(self, url: str, model: str | None, api_key: str | None):
        import openai

        self.client = openai.OpenAI(base_url=url, api_key=api_key or "-", max_retries=2)
        self.model = model or self.client.models.list().data[0].id

    def answer(self, prompts, max_new_tokens: int) -> list[str]:
        return [self.client.chat.completions.create(
            model=self.model, messages=p.messages, tools=p.tools or None, temperature=0, max_tokens=max_new_tokens,
        ).choices[0].message.content or "" for p in prompts]

    def pick_letters(self, prompts) -> list[str | None]:
        return [letter_of(text) for text in self.answer(prompts, 8)]


def evaluate(backend, tasks: list[str], max_new_tokens: int = 128, limit: int | None = None) -> dict:
    results = {}
    for task in tasks:
        kind, items = read_task(task)
        items = items[:limit] if limit else items
        name = Path(task).name
        if kind == "mcq":
            picks = backend.pick_letters([item.prompt for item in items])
            correct = sum(pick == item.answer for pick, item in zip(picks, items))
            results[name] = {"kind": "mcq", "n": len(items), "correct": correct,
                             "accuracy": round(100 * correct / len(items), 2) if items else None}
        else:
            answers = backend.answer([item.prompt for item in items], max_new_tokens)
            results[name] = {"kind": "qa", "n": len(items), **qa_scores(answers, [i.reference for i in items])}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':<32} {'kind':<7} {'n':>6}  metrics"]
    for name, r in results.items():
        if r["kind"] == "mcq":
            metrics = f"accuracy {r['accuracy']}% ({r['correct']}/{r['n']})"
        elif r["kind"] == "qa":
            metrics = f"ROUGE-L F1 {r['rougeL_f1']}  BLEU {r['bleu']}"
        else:  # lm-eval's own metrics, on its own scale (fractions)
            from megaswift.serve.harness import format_metrics
            metrics = format_metrics(r)
        lines.append(f"{name:<32} {r['kind']:<7} {r['n'] if r['n'] is not None else '-':>6}  {metrics}")
    return "\n".join(lines)


def write_results(results: dict, output: str | Path, about: dict) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps({**about, "tasks": results}, indent=2) + "\n")
