"""`megaswift convert hf2mcore | mcore2hf`: checkpoint conversion (see converters/).

hf2mcore also runs as several processes, on one node or many, each converting its share of the tensors into
one checkpoint: `megaswift launch --nproc-per-node N -- megaswift convert hf2mcore HF_DIR OUT_DIR`
(slurm/convert.sh on a cluster).
"""
import argparse
import os
import sys

from megaswift.cli.startup import reuse_freed_memory, start_up_imports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = sub.add_parser("hf2mcore", help="HF folder -> megatron-core dist checkpoint (torch_dist); in N "
                                               "processes: `megaswift launch --nproc-per-node N -- megaswift "
                                               "convert ...`")
    to_mcore.add_argument("hf_dir", metavar="HF_DIR")
    to_mcore.add_argument("out_dir", metavar="OUT_DIR")
    to_mcore.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                          help="dtype of the written weights (default: keep each tensor's dtype)")
    to_hf = sub.add_parser("mcore2hf", help="megaswift / megatron-core checkpoint -> HF folder (also in N processes, "
                                            "as hf2mcore)")
    to_hf.add_argument("mcore_dir", metavar="MCORE_DIR", help="checkpoint root (uses `latest`) or an iter_* folder")
    to_hf.add_argument("out_dir", metavar="OUT_DIR")
    to_mcore.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                          help="also import this PEFT LoRA/DoRA adapter of the model into OUT_DIR/adapter/, to "
                               "continue training it with --checkpoint.load OUT_DIR --tuner.type lora|dora")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    to_hf.add_argument("--hf-config", default=None, metavar="DIR_OR_FILE",
                       help="for a checkpoint megaswift did not write (Megatron-LM, Megatron-Bridge, ms-swift: "
                            "latest_checkpointed_iteration.txt + iter_N/ in torch_dist): the HF config.json (or its "
                            "folder, whose tokenizer files are copied too) of the model it holds")
    to_hf.add_argument("--merge", action="store_true",
                       help="for a LoRA/DoRA checkpoint: write the full HF model with the adapter merged (in fp32, "
                            "saved in the base's dtype) instead of a PEFT adapter folder")
    to_hf.add_argument("--base-model-name-or-path", default=None,
                       help="for a LoRA/DoRA checkpoint: base_model_name_or_path in adapter_config.json (default: "
                            "what an imported adapter said, else the base checkpoint's path)")
    for p in (to_mcore, to_hf):
        p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                       help="check coverage and logits against transformers after converting "
                            "(default: on when both models fit in memory)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        p.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                       help="write the output with O_DIRECT, bypassing the page cache (2x faster than buffered "
                            "writes on the CI machine); used only where the file system accepts it")


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from converters import ConversionError, hf2mcore, mcore2hf
        from megaswift.config import ConfigError
        from megaswift.models import UnsupportedModelError
    reuse_freed_memory(args)  # tensor after tensor: freed memory reused rather than fresh pages each time

    try:
        if args.direction == "hf2mcore":
            report = hf2mcore(args.hf_dir, args.out_dir, dtype=args.dtype, verify=args.verify,
                              overwrite=args.overwrite, progress=args.progress, adapter=args.adapter,
                              direct_io=args.direct_io)
        else:
            report = mcore2hf(args.mcore_dir, args.out_dir, max_shard_size=args.max_shard_size, verify=args.verify,
                              overwrite=args.overwrite, progress=args.progress, merge=args.merge,
                              base_name_or_path=args.base_model_name_or_path, hf_config=args.hf_config,
                              direct_io=args.direct_io)
    except (ConversionError, UnsupportedModelError, ConfigError, ValueError) as e:
        print(f"megaswift convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0  # several ranks converted together (megaswift launch): rank 0 reports for all
    logits = report.get("logits", {})
    checked = (f"; logits max |diff| {logits['max_abs_diff']:.3g} <= {logits['threshold']}"
               if "max_abs_diff" in logits else f"; logit check skipped: {logits['skipped']}" if logits else "")
    print(f"megaswift convert {args.direction}: wrote {args.out_dir}{checked}")
    return 0
