"""8 concurrent streaming chat requests against one, on `megaswift deploy` serving the tiny model.

    python benchmarks/serve_concurrency.py [--concurrent 8] [--tokens 64] [--hidden 64]

Starts the server as a subprocess (as users run it), talks to it with the official `openai` client,
generates exactly --tokens tokens per request (`ignore_eos`), and reports the wall time of one request
(median of 3), of --concurrent requests started together, their ratio (target: <= 3), requests/s and
tokens/s. Results: benchmarks/results/serve_concurrency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.serve.server_process: the same server start as the tests


def _stream_one(client, tokens: int) -> int:
    stream = client.chat.completions.create(
        model="model", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    return [chunk for chunk in stream][-1].usage.completion_tokens


def _timed_together(client, count: int, tokens: int) -> tuple[float, int]:
    barrier, done = threading.Barrier(count + 1), []

    def worker():
        barrier.wait()
        done.append(_stream_one(client, tokens))

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, sum(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_concurrency.json"))
    args = parser.parse_args()

    import openai
    import torch
    import transformers

    from megaswift.serve.tiny_model import build_tiny_chat_model
    from tests.serve.server_process import start_server

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_chat_model(Path(tmp) / "model", steps=1, hidden=args.hidden)
        process, url = start_server(model_dir, log=Path(tmp) / "server.log")
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
            _timed_together(client, 2, 8)  # warm-up: first-call costs out of the measurement
            singles = [_timed_together(client, 1, args.tokens)[0] for _ in range(3)]
            together, generated = _timed_together(client, args.concurrent, args.tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
    one = statistics.median(singles)
    result = {
        "concurrent": args.concurrent, "tokens_per_request": args.tokens, "hidden": args.hidden,
        "one_request_s": round(one, 3), "concurrent_s": round(together, 3),
        "ratio": round(together / one, 2), "target_ratio": 3.0,
        "one_request_tokens_per_s": round(args.tokens / one, 1),
        "concurrent_tokens_per_s": round(generated / together, 1),
        "concurrent_requests_per_s": round(args.concurrent / together, 2),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},  # other work on the machine
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
