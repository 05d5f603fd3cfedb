"""Process-wide settings a `megaswift` command makes for itself as its process's program (never for an
in-process caller, such as a test calling `main([...])`: `args.owns_process`, set by cli/main.py).

`start_up_imports`: importing torch, megatron-core and transformers creates ~450-750k objects that live for the whole run.
While they are imported the collector walks them again and again (~1000 collections: 0.85 s of the
3.6 s the converters' imports take on the 2-core CI machine), and afterwards each full collection walks
them once more (a later loop allocating 300k small lists: 2.0 s, 0.06 s with them frozen). So the
collector is paused while a command imports, and everything alive then is frozen: never walked again.
The imports' own cyclic garbage (~5 MB) is frozen with it, which is cheaper than walking everything
once to find it (0.4 s).

`reuse_freed_memory`: for conversions, large blocks from malloc's heap, reused once freed.
"""
import argparse
import ctypes
import gc
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@contextmanager
def start_up_imports(args: argparse.Namespace):
    """The collector paused while the command imports, then everything alive frozen."""
    if not getattr(args, "owns_process", False) or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def reuse_freed_memory(args: argparse.Namespace, largest_bytes: int = 256 << 20) -> bool:
    """For a command that allocates and frees tensor after tensor (a conversion): glibc serves every block
    above 32 MiB from a fresh mmap, whose pages fault one by one on first touch (in this VM ~1 GB/s); with
    the thresholds raised, blocks up to `largest_bytes` come from the heap and freed ones are reused, and
    memory stays bounded by the few tensors alive at once. Measured: `megaswift convert mcore2hf` of 1.87
    GiB, system CPU 1.9-5.4 s -> 1.1 s. Returns whether glibc took the settings (elsewhere: nothing)."""
    if not getattr(args, "owns_process", False):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # freed memory at the heap's top is given back only beyond 2 of the largest blocks
    return (mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(largest_bytes)) == 1
            and mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * largest_bytes)) == 1)
