"""`megaswift infer`: generate answers for a dataset (jsonl in, jsonl out), or chat in the terminal."""
import argparse
import sys

from megaswift.cli.startup import start_up_imports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.model_args import add_model_arguments, add_sampling_arguments

    add_model_arguments(parser)
    parser.add_argument("--adapter", default=None,
                        help="which of --adapters answers (default: the first one given; `base` for none)")
    parser.add_argument("--data.datasets", dest="datasets", nargs="+", default=[], metavar="PATH[#N]",
                        help="prompt rows in any format `megaswift sft` reads (the final assistant turn, if any, "
                             "is kept as `reference`); without it: interactive chat")
    parser.add_argument("--output", default=None, help="answers jsonl (default: <first dataset>.answers.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--system", default=None, help="interactive chat: a system prompt")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.data.sft.formats import SampleFormatError
        from megaswift.serve.loading import ModelLoadError
        from megaswift.serve.model_args import load_from_args, sampling_from_args
        from megaswift.serve.offline import chat_in_terminal, infer_datasets

    try:
        sampling = sampling_from_args(args)
        loaded = load_from_args(args)
        adapter = args.adapter or (loaded.adapters[0] if loaded.adapters else None)
        adapter = None if adapter == "base" else adapter
        if adapter is not None and adapter not in loaded.adapters:
            raise ModelLoadError(f"--adapter {adapter}: expected one of {['base', *loaded.adapters]}")
        if args.datasets:
            output = args.output or f"{args.datasets[0].split('#')[0].rsplit('.', 1)[0]}.answers.jsonl"
            infer_datasets(loaded, args.datasets, output, sampling, args.max_new_tokens, tuple(args.stop),
                           adapter, args.batch_size)
        else:
            chat_in_terminal(loaded, sampling, args.max_new_tokens, tuple(args.stop), adapter, args.system)
    except (ModelLoadError, SampleFormatError, ValueError, FileNotFoundError) as err:
        print(f"megaswift infer: error: {err}", file=sys.stderr)
        return 1
    return 0
