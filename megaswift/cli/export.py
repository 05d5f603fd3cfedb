"""`megaswift export --quant`: quantize an exported HF model folder (bitsandbytes NF4 / int8)."""
import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.quantize import QUANT_METHODS

    parser.add_argument("--model", required=True, help="an HF model folder (e.g. from `megaswift convert mcore2hf`)")
    parser.add_argument("--quant", required=True, choices=QUANT_METHODS,
                        help="bnb-nf4 / bnb-int8: bitsandbytes, CPU or GPU; the others are not offered yet")
    parser.add_argument("--output", required=True, help="the quantized folder (loads with transformers as it is)")
    parser.add_argument("--eval-text", default=None,
                        help="held-out text for perplexity (.txt, or .jsonl: its text fields); default: part of "
                             "Python's documentation")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    from megaswift.serve.quantize import QuantizationError, quantize

    try:
        report = quantize(args.model, args.quant, args.output, args.eval_text, args.device)
    except (QuantizationError, OSError, ValueError) as err:
        print(f"megaswift export: error: {err}", file=sys.stderr)
        return 1
    mib = 1024 * 1024
    print(f"megaswift export: {args.quant} -> {args.output}\n"
          f"  weights on disk  {report['bytes_before'] / mib:.2f} MiB -> {report['bytes_after'] / mib:.2f} MiB\n"
          f"  perplexity       {report['perplexity_before']} -> {report['perplexity_after']} "
          f"(held-out: {report['held_out']})")
    return 0
