"""`megaswift eval`: score a model (local folder or OpenAI-compatible URL) on MCQ CSV and QA jsonl sets."""
import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.model_args import add_model_arguments

    add_model_arguments(parser, required=False)
    parser.add_argument("--adapter", default=None, help="which of --adapters to evaluate (default: the first one)")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible server instead of --model, e.g. "
                                                    "http://127.0.0.1:8000/v1 (a `megaswift deploy`)")
    parser.add_argument("--api-key", default=None, help="the server's API key (--url)")
    parser.add_argument("--served-model", default=None, help="model name at --url (default: the first listed)")
    parser.add_argument("--tasks", required=True, help="comma-separated files: *.csv (MCQ), *.jsonl (QA)")
    parser.add_argument("--output", default="eval_results.json")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="QA answer length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")


def run(args: argparse.Namespace) -> int:
    from megaswift.data.sft.formats import SampleFormatError
    from megaswift.serve.evaluate import LocalModel, RemoteModel, evaluate, format_table, write_results
    from megaswift.serve.loading import ModelLoadError
    from megaswift.serve.model_args import load_from_args

    tasks = [t for t in args.tasks.split(",") if t]
    try:
        if (args.model is None) == (args.url is None):
            raise ValueError("give exactly one of --model DIR (a local model) and --url URL (a server)")
        if args.url:
            backend, about = RemoteModel(args.url, args.served_model, args.api_key), {"url": args.url}
            about["model"] = backend.model
        else:
            loaded = load_from_args(args)
            adapter = args.adapter or (loaded.adapters[0] if loaded.adapters else None)
            backend, about = LocalModel(loaded, adapter, args.batch_size), {"model": args.model, "adapter": adapter}
        results = evaluate(backend, tasks, args.max_new_tokens, args.limit)
    except (ModelLoadError, SampleFormatError, ValueError, FileNotFoundError) as err:
        print(f"megaswift eval: error: {err}", file=sys.stderr)
        return 1
    write_results(results, args.output, about)
    print(format_table(results))
    print(f"megaswift eval: results in {args.output}")
    return 0
