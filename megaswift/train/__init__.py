"""The training loop around megatron-core's schedules, optimizer and dist_checkpointing."""
