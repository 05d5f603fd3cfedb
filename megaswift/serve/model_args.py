"""The flags `infer`, `deploy` and `eval` share: which model, which adapters, how to load them."""
from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required,
                       help="an HF model folder (e.g. from `megaswift convert mcore2hf`), or a megaswift checkpoint "
                            "(root or iter_* folder), exported on the fly into --export-cache")
    group.add_argument("--adapters", nargs="+", default=[], metavar="NAME=DIR",
                       help="PEFT LoRA adapters to load on the base model, each under a name")
    group.add_argument("--served-name", default=None, help="the base model's name (default: its folder's name)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--export-cache", default=None,
                       help="where checkpoints are exported (default: $MEGASWIFT_EXPORT_CACHE or "
                            "~/.cache/megaswift/exported)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", nargs="+", default=[], help="stop sequences (the text ends before them)")


def load_from_args(args: argparse.Namespace):
    """LoadedModel for the parsed model flags (ModelLoadError on a bad folder or adapter)."""
    from megaswift.serve.loading import load_model, parse_adapters, resolve_model_dir

    adapters = parse_adapters(args.adapters)
    model_dir = resolve_model_dir(args.model, args.export_cache)
    return load_model(model_dir, adapters, name=args.served_name, dtype=args.dtype, device=args.device)


def sampling_from_args(args: argparse.Namespace):
    from megaswift.serve.engine import Sampling

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise ValueError(f"expected --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1; found "
                         f"{args.temperature}, {args.top_p}, {args.max_new_tokens}")
    return Sampling(args.temperature, args.top_p, args.top_k, args.seed)
