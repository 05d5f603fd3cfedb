"""Inference without a server: a dataset of prompts to a jsonl of answers, and a chat in the terminal."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megaswift.data.sft.formats import location
from megaswift.serve.engine import GenerationRequest, Generator, Sampling
from megaswift.serve.loading import LoadedModel
from megaswift.serve.rendering import ChatRenderer, Prompt, prompt_from_row
from megaswift.serve.tool_calls import parse_tool_calls


def read_prompts(datasets: list[str]) -> list[tuple[str, Prompt]]:
    """(where, prompt) of every row of the dataset specs (`path`, `path#N`), in order."""
    from megaswift.data.sft.sources import load_source

    prompts = []
    for spec in datasets:
        for row in load_source(spec):
            where = location(row["origin"], row["line"])
            prompts.append((where, prompt_from_row(json.loads(row["raw"]), where)))
    return prompts


def _answer_row(where: str, prompt: Prompt, result, tools: bool) -> dict:
    parsed = parse_tool_calls(result.text) if tools else None
    row = {"source": where, "messages": prompt.messages, "response": result.text,
           "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
           "completion_tokens": result.completion_tokens}
    if prompt.tools:
        row["tools"] = prompt.tools
    if parsed and parsed.tool_calls:
        row["tool_calls"] = parsed.tool_calls
    if prompt.reference is not None:
        row["reference"] = prompt.reference
    return row


def infer_datasets(loaded: LoadedModel, datasets: list[str], output: str | Path, sampling: Sampling,
                   max_new_tokens: int, stop: tuple[str, ...] = (), adapter: str | None = None,
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Answers every prompt, batch by batch, into `output` (one JSON object per prompt, in order); returns
    and prints the totals (rows, tokens, tokens/s)."""
    from tqdm import tqdm

    renderer, generator = ChatRenderer(loaded.tokenizer), Generator(loaded)
    prompts = read_prompts(datasets)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    generated, start = 0, time.perf_counter()
    with output.open("w", encoding="utf-8") as out, tqdm(total=len(prompts), unit="row", disable=not progress) as bar:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            requests = []
            for where, prompt in batch:
                ids = renderer.prompt_ids(prompt)
                room = loaded.context_length - len(ids)
                if room < 1:
                    raise ValueError(f"{where}: the prompt has {len(ids)} tokens, the model's context "
                                     f"{loaded.context_length}: shorten the row or drop it")
                requests.append(GenerationRequest(ids, min(max_new_tokens, room), sampling, stop, adapter))
            for (where, prompt), result in zip(batch, generator.generate(requests)):
                out.write(json.dumps(_answer_row(where, prompt, result, bool(prompt.tools)), ensure_ascii=False) + "\n")
                generated += result.completion_tokens
            seconds = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{generated / seconds:.1f}")
    seconds = time.perf_counter() - start
    totals = {"rows": len(prompts), "generated_tokens": generated, "seconds": round(seconds, 3),
              "tokens_per_s": round(generated / seconds, 2) if seconds else None, "output": str(output)}
    print(f"megaswift infer: {totals['rows']} rows, {generated} tokens in {seconds:.1f} s "
          f"({totals['tokens_per_s']} tokens/s) -> {output}")
    return totals


def chat_in_terminal(loaded: LoadedModel, sampling: Sampling, max_new_tokens: int, stop: tuple[str, ...] = (),
                     adapter: str | None = None, system: str | None = None, read=input, write=sys.stdout.write) -> None:
    """A conversation in the terminal, the answer streamed as it is generated. /clear starts over, /exit
    (or end of input) leaves."""
    renderer, generator = ChatRenderer(loaded.tokenizer), Generator(loaded)
    first = [{"role": "system", "content": system}] if system else []
    messages = list(first)
    write("megaswift infer: chat (/clear to start over, /exit to leave)\n")
    while True:
        try:
            text = read("user> ")
        except EOFError:
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/clear":
            messages = list(first)
            continue
        messages.append({"role": "user", "content": text})
        ids = renderer.prompt_ids(prompt_from_row({"messages": messages}, "chat"))
        room = loaded.context_length - len(ids)
        if room < 1:
            write(f"(the conversation has {len(ids)} tokens, the context {loaded.context_length}: /clear)\n")
            messages.pop()
            continue
        write("assistant> ")
        request = GenerationRequest(ids, min(max_new_tokens, room), sampling, stop, adapter,
                                    on_text=lambda piece: (write(piece), sys.stdout.flush()))
        (result,) = generator.generate([request])
        write("\n")
        messages.append({"role": "assistant", "content": result.text})
