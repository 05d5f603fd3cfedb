"""`megaswift preprocess`: jsonl / txt / parquet -> Megatron indexed dataset for `megaswift pt`."""
import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, nargs="+", required=True, help=".jsonl, .json, .txt or .parquet files")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    parser.add_argument("--no-eod", action="store_true", help="do not append the eos token to each document")
    parser.add_argument("--per-line", action="store_true", help=".txt: one document per line")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip (and count) rows that cannot be read (invalid JSON or UTF-8, no text field) "
                             "instead of stopping")


def run(args: argparse.Namespace) -> int:
    from megaswift.config import ConfigError
    from megaswift.data.preprocess import preprocess
    try:
        stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.text_key, not args.no_eod,
                           args.workers, args.per_line, skip_bad_rows=args.skip_bad_rows)
    except ConfigError as e:
        print(f"megaswift preprocess: error: {e}", file=sys.stderr)
        return 2
    if stats.skipped:
        print(f"megaswift preprocess: skipped {stats.skipped} bad rows, e.g. {'; '.join(stats.skipped_examples)}",
              file=sys.stderr)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens in "
          f"{stats.seconds:.1f}s ({stats.tokens / max(stats.seconds, 1e-9):.0f} tokens/s)")
    return 0
