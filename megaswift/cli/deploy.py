"""`megaswift deploy`: an OpenAI-compatible server (FastAPI + uvicorn) for a model and its LoRA adapters."""
import argparse
import sys

from megaswift.cli.startup import start_up_imports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.model_args import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="clients must send it as a Bearer token (default: none)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests generated together, at most")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for others to join it")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="chat completion length when a request sets no max_tokens (capped by the context)")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="transformers: megaswift's FastAPI server (CPU or GPU); vllm: hands over to vLLM's own "
                             "OpenAI server (CUDA, vLLM installed; not exercised in CI)")


def _clean_exit_server_class():
    import contextlib
    import signal

    import uvicorn

    class CleanExitServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM once its graceful shutdown is done, so the process ends killed by the
        signal (status -15). A stop that was asked for and carried out is a clean exit here (status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return CleanExitServer


def _hand_over_to_vllm(args: argparse.Namespace) -> int:
    """Replace this process with vLLM's OpenAI server (see megaswift/serve/vllm_backend.py)."""
    import os
    from pathlib import Path

    from megaswift.serve.loading import ModelLoadError, parse_adapters, resolve_model_dir
    from megaswift.serve.vllm_backend import VLLMUnavailable, require_vllm, vllm_command

    try:
        require_vllm()
        adapters = parse_adapters(args.adapters)
        model_dir = resolve_model_dir(args.model, args.export_cache)
        command = vllm_command(model_dir, args.served_name or Path(model_dir).resolve().name, adapters, args.host,
                               args.port, args.api_key, args.dtype, args.max_batch_size)
    except (VLLMUnavailable, ModelLoadError, ValueError, OSError) as err:
        print(f"megaswift deploy: error: {err}", file=sys.stderr)
        return 1
    shown = [part if part != args.api_key else "***" for part in command]
    print(f"megaswift deploy: handing over to vLLM: {' '.join(shown)}", flush=True)
    os.execv(command[0], command)


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.serve.loading import ModelLoadError
        from megaswift.serve.model_args import load_from_args

    if args.backend == "vllm":
        return _hand_over_to_vllm(args)
    try:
        loaded = load_from_args(args)
    except (ModelLoadError, ValueError, OSError) as err:
        print(f"megaswift deploy: error: {err}", file=sys.stderr)
        return 1
    import uvicorn

    from megaswift.serve.app import OpenAIServer, build_app
    from megaswift.serve.engine import BatchingEngine, Generator

    server_class = _clean_exit_server_class()
    engine = BatchingEngine(Generator(loaded), args.max_batch_size, args.batch_wait_ms)
    app = build_app(OpenAIServer(engine, args.api_key, args.default_max_tokens))
    names = ", ".join([loaded.name, *loaded.adapters])
    print(f"megaswift deploy: serving {names} on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn stops on SIGTERM/SIGINT gracefully: no new connections, open requests finished, then the
    # app's lifespan shutdown stops the generation worker.
    server_class(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=30)).run()
    print("megaswift deploy: stopped", flush=True)
    return 0
