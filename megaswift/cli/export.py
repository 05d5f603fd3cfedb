"""`megaswift export --quant`: quantize an exported HF model folder (bitsandbytes NF4 / int8, GPTQ / AWQ int4 with
gptqmodel, FP8 with torchao)."""
import argparse
import sys

from megaswift.cli.startup import start_up_imports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.quantize import DEFAULT_CALIB_SAMPLES, DEFAULT_GROUP_SIZE, QUANT_METHODS

    parser.add_argument("--model", required=True, help="an HF model folder (e.g. from `megaswift convert mcore2hf`)")
    parser.add_argument("--quant", required=True, choices=QUANT_METHODS,
                        help="bnb-nf4 / bnb-int8: bitsandbytes; gptq-int4 / awq-int4: gptqmodel, calibrated; "
                             "fp8: torchao float8 weights; all run on CPU or GPU")
    parser.add_argument("--output", required=True, help="the quantized folder (loads with transformers as it is)")
    parser.add_argument("--calib", default=None,
                        help="gptq-int4 / awq-int4 calibration data: an SFT .jsonl (rendered with the model's "
                             "chat template, as in training) or a .txt; default: part of Python's documentation")
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                        help="calibration samples used at most")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="gptq-int4 / awq-int4: weights per quantization group (must divide the layer sizes)")
    parser.add_argument("--eval-text", default=None,
                        help="held-out text for perplexity (.txt, or .jsonl: its text fields); default: part of "
                             "Python's documentation")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.data.sft.formats import SampleFormatError
        from megaswift.serve.quantize import QuantizationError, quantize

    try:
        report = quantize(args.model, args.quant, args.output, args.eval_text, args.device, calib_file=args.calib,
                          group_size=args.group_size, calib_samples=args.calib_samples)
    except (QuantizationError, SampleFormatError, OSError, ValueError) as err:
        print(f"megaswift export: error: {err}", file=sys.stderr)
        return 1
    mib = 1024 * 1024
    print(f"megaswift export: {args.quant} -> {args.output}\n"
          f"  weights on disk  {report['bytes_before'] / mib:.2f} MiB -> {report['bytes_after'] / mib:.2f} MiB\n"
          f"  perplexity       {report['perplexity_before']} -> {report['perplexity_after']} "
          f"(held-out: {report['held_out']})")
    if "calibration" in report:
        print(f"  calibration      {report['calibration_samples']} samples of {report['calibration']}")
    return 0
