"""Checkpoint layout (layout.py) and megatron-core save/load of training state (state.py)."""
