"""HF <-> megatron-core checkpoint conversion: each model family's conversion rules
(megaswift/models/families/), used by both directions (hf2mcore.py, mcore2hf.py), streaming readers and
writers, and a verification gate."""
from converters.errors import ConversionError
from converters.hf2mcore import hf2mcore
from converters.mcore2hf import mcore2hf

__all__ = ["ConversionError", "hf2mcore", "mcore2hf"]
