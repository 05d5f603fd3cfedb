"""A command's start-up imports, made without Python's cyclic garbage collector.

Importing torch, megatron-core and transformers creates ~450-750k objects that live for the whole run.
While they are imported the collector walks them again and again (~1000 collections: 0.85 s of the
3.6 s the converters' imports take on the 2-core CI machine), and afterwards each full collection walks
them once more (a later loop allocating 300k small lists: 2.0 s, 0.06 s with them frozen). So the
collector is paused while a command imports, and everything alive then is frozen: never walked again.
The imports' own cyclic garbage (~5 MB) is frozen with it, which is cheaper than walking everything
once to find it (0.4 s).
"""
import argparse
import gc
from contextlib import contextmanager


@contextmanager
def start_up_imports(args: argparse.Namespace):
    """Only where the command is its process's program (`args.owns_process`, set by cli/main.py): an
    in-process caller, such as a test calling `main([...])`, keeps its collector as it is."""
    if not getattr(args, "owns_process", False) or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
