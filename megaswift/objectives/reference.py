"""DPO's reference log-probs: where they come from (`--rlhf.reference`), all giving the same numbers.

    model        a frozen copy of the starting checkpoint (checkpoint.load; without one, the policy's
                 weights before the first step), held beside the policy (its weights only: no gradients,
                 no optimizer state; measured by benchmarks/dpo_memory.py). Before each step's training
                 schedule, megatron-core's forward-backward function runs it with forward_only=True over the
                 same micro-batches, so every layout the policy runs (TP, PP, VPP, SP, EP) runs the
                 reference too.
    precomputed  one forward-only pass of the starting policy over every pair of the data before the first
                 step; the per-pair sums are gathered on every rank, kept as a table keyed by the pair's
                 index in its split, and stored as `reference_logps.pt` in the run's folder
                 (checkpoint.save, else logging.output_dir). A resumed run reads the table back: no second
                 model, no second pass.
    adapters     LoRA runs: the policy itself with its adapters disabled (megaswift.tuners).

Each writes `reference_logps` ([2, pairs]: chosen, rejected; on the last pipeline stage) into the
micro-batches of the step; the loss (objectives/dpo.py) reads it there.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.config import ConfigError

TABLE_FILE = "reference_logps.pt"


def _forward_only(step, chunks, forward_step, batches_per_chunk: list[list[dict]], context=contextlib.nullcontext):
    """Runs `forward_step` over the given micro-batches (one list per chunk) with forward_only=True, in eval
    mode (no dropout), restoring each chunk's mode afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    seq_length, micro_batch_size = step.micro_batch_shape
    try:
        with torch.no_grad(), context():
            step.forward_backward(forward_step_func=forward_step, data_iterator=[iter(b) for b in batches_per_chunk],
                                  model=chunks, num_microbatches=len(batches_per_chunk[0]), seq_length=seq_length,
                                  micro_batch_size=micro_batch_size, forward_only=True)
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def _logps_writer(objective):
    """A forward step whose loss function stores the micro-batch's per-pair log-probs in the batch dict."""
    from megaswift.objectives.dpo import batch_logps
    from megaswift.train.forward_step import batch_to_device, model_forward
    fused, vocab = objective.plan.config.train.fused_loss, objective.plan.hf["vocab_size"]

    def forward_step(data_iterator, model):
        original = next(data_iterator)
        batch = batch_to_device(original)
        output = model_forward(model, batch, fused)

        def store(output):
            logps = batch_logps(batch, output, fused, vocab)
            original["reference_logps"] = torch.stack([logps.chosen, logps.rejected]).detach()
            zero = output.new_zeros(())
            return zero, torch.tensor(0, dtype=torch.int, device=zero.device), {}
        return output, store
    return forward_step


class FrozenCopy:
    """rlhf.reference=model: reference chunks built like the policy's, loaded from the starting checkpoint."""

    def __init__(self, objective, step):
        from megaswift.checkpointing import rng
        from megaswift.models.builder import build_model_chunks
        from megatron.core.utils import get_model_config
        cfg = objective.plan.config
        self.objective = objective
        tconfig = copy.copy(get_model_config(step.model[0]))
        tconfig.perform_initialization = False  # weights come from the checkpoint or the policy
        with rng.preserved():  # building draws nothing the policy's training would otherwise draw
            # the policy's layer spec, as the trainer resolved it (not model.layer_spec's `auto` again)
            self.chunks = build_model_chunks(objective.plan.hf, tconfig, objective.plan.layer_spec)
        for chunk in self.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        if cfg.checkpoint.load:
            from megaswift.checkpointing.state import load_checkpoint
            from megaswift.train.resume import resolve_checkpoint
            load_checkpoint(resolve_checkpoint(cfg.checkpoint.load), self.chunks, verify=False)
        elif step.step == 1:
            for reference, policy in zip(self.chunks, step.model):
                reference.load_state_dict(getattr(policy, "module", policy).state_dict(), strict=True)
        else:
            raise ConfigError("rlhf.reference=model: this run resumes at step "
                              f"{step.step} but names no starting checkpoint for the frozen reference; give "
                              "--checkpoint.load (the checkpoint the run started from), or use "
                              "--rlhf.reference precomputed")
        self.forward_step = _logps_writer(objective)

    def annotate(self, step, batches) -> None:
        _forward_only(step, self.chunks, self.forward_step, batches)


class DisabledAdapters:
    """rlhf.reference=adapters: the policy with its LoRA adapters switched off."""

    def __init__(self, objective, step):
        from megaswift.tuners import adapters_disabled
        if objective.plan.config.tuner.type == "full":
            raise ConfigError("rlhf.reference=adapters: the run trains every weight (tuner.type=full), so there "
                              "are no adapters to disable; use --rlhf.reference model or precomputed, or "
                              "--tuner.type lora")
        if objective.plan.config.tuner.modules_to_save:
            raise ConfigError("rlhf.reference=adapters: tuner.modules_to_save "
                              f"{objective.plan.config.tuner.modules_to_save} trains those modules in full, so "
                              "disabling the adapters no longer gives the starting model; use --rlhf.reference "
                              "model or precomputed")
        self.disabled, self.forward_step = adapters_disabled, _logps_writer(objective)

    def annotate(self, step, batches) -> None:
        _forward_only(step, step.model, self.forward_step, batches, context=lambda: self.disabled(step.model))


def _fingerprint(objective, splits) -> str:
    """What the table depends on besides the weights: the data settings and the encoded pairs' layout."""
    data = objective.plan.config.data
    described = {"datasets": list(data.datasets), "seq_length": data.seq_length, "loss_on": data.loss_on,
                 "loss_scale": data.loss_scale, "over_length": data.over_length,
                 "seed": objective.plan.config.train.seed,
                 "valid_fraction": data.valid_fraction,
                 "lengths": {name: rows.lengths for name, rows in splits.items() if rows is not None}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class PrecomputedTable:
    """rlhf.reference=precomputed: per-pair reference log-probs of each split, computed once or read back."""

    def __init__(self, objective, step):
        cfg = objective.plan.config
        folder = Path(cfg.checkpoint.save or cfg.logging.output_dir)
        self.path = folder / TABLE_FILE
        rows = objective.data.split_rows()
        splits = {"train": rows[0], "valid": rows[1]}
        fingerprint = _fingerprint(objective, splits)
        if self.path.is_file():
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored.get("fingerprint") != fingerprint:
                raise ConfigError(f"rlhf.reference=precomputed: {self.path} was computed for other data or data "
                                  f"settings; delete it to recompute it (only possible from the starting weights)")
            self.tables = {name: stored[name] for name in splits if name in stored}
            return
        if step.step != 1:
            raise ConfigError(f"rlhf.reference=precomputed: the run resumes at step {step.step} but {self.path} "
                              f"is missing; the reference log-probs can only be computed from the starting weights")
        writer = _logps_writer(objective)
        self.tables = {name: self._compute(objective, step, writer, split)
                       for name, split in splits.items() if split is not None}
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"fingerprint": fingerprint, **self.tables}, self.path)

    @staticmethod
    def _compute(objective, step, writer, rows) -> torch.Tensor:
        """[pairs, 2] reference log-probs of every pair of `rows`, the same on every rank."""
        from megaswift.data.micro_batches import MicroBatches
        from megaswift.data.rlhf.training_source import collate_pair_rows
        micro, attention = objective.plan.config.train.micro_batch_size, objective.data.packed_attention
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        count = math.ceil(len(rows) / (micro * dp_size))  # the last micro-batches wrap around to the start
        collate = lambda samples: collate_pair_rows(samples, attention)
        batches = [[next(it) for _ in range(count)]
                   for it in (MicroBatches(rows, micro, dp_rank, dp_size, 0, collate) for _ in step.model)]
        _forward_only(step, step.model, writer, batches)
        pairs = len(rows.lengths)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        sums = torch.zeros(pairs, 3, dtype=torch.float64, device=device)  # chosen, rejected, how often computed
        contributes = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0
        if contributes:
            for batch in batches[-1]:
                index = batch["pair_index"].to(device)
                logps = batch["reference_logps"].to(device, torch.float64)
                sums.index_add_(0, index, torch.stack([logps[0], logps[1], torch.ones_like(logps[0])], 1))
        dist.all_reduce(sums)
        if bool((sums[:, 2] == 0).any()):
            raise RuntimeError("rlhf: the reference pass missed some pairs (a bug)")
        return (sums[:, :2] / sums[:, 2:]).float().cpu()

    def annotate(self, step, batches) -> None:
        table = self.tables["valid" if step.step is None else "train"]
        for chunk_batches in batches:
            for batch in chunk_batches:
                batch["reference_logps"] = table[batch["pair_index"]].T.contiguous()


SOURCES = {"model": FrozenCopy, "precomputed": PrecomputedTable, "adapters": DisabledAdapters}


def make_reference(name: str, objective, step):
    return SOURCES[name](objective, step)
