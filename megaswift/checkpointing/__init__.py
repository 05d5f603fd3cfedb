"""Checkpoints on disk: the layout (layout.py), megatron-core save/load of training state (state.py, with
rng.py and param_groups.py), one run per folder (lock.py), file sums and damage reports (integrity.py), disk
space (space.py), and which old checkpoints to delete (retention.py)."""
