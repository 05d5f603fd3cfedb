"""LoRA / DoRA adapters on megatron-core's ColumnParallelLinear and RowParallelLinear, at any TP/SP.

A fused base layer (linear_qkv = q, k, v; linear_fc1 = gate, up) gets one adapter part per HF module,
each with its own A and B, so any PEFT adapter is represented exactly. The parts' outputs are placed in
the base layer's local output layout by the family's own transform (interleaved query groups, [gate; up]).

Tensor parallelism, as the base layer is split:
- column-parallel base: A replicated, B (and DoRA's magnitude) split by rows. The low-rank activation
  h = x A^T goes through copy_to_tensor_model_parallel_region before B, so dL/dh is summed over TP and
  A's gradient is complete on every rank. With sequence parallelism h is computed on this rank's
  sequence shard and all-gathered (the backward reduce-scatters); A's gradient then covers this rank's
  tokens only, so A is marked `sequence_parallel` and megatron-core's finalize_model_grads all-reduces
  it over TP, as it does for SP layernorm weights.
- row-parallel base: A split by columns; the partial h is all-reduced (reduce-scattered with SP) before
  B, which is replicated (marked `sequence_parallel` with SP, its gradient then covering local tokens).
DoRA's weight norm is per output row of W + scale * B A: local rows at column-parallel, partial sums over
the input shards all-reduced at row-parallel; it is detached as PEFT does.
"""
import math

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint
from torch import nn

from megaswift.models.families.transforms import Dims, Transform


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class AdapterPart(nn.Module):
    """One HF module's adapter: this rank's slices of PEFT's lora_A (r, in), lora_B (out, r) and, for
    DoRA, lora_magnitude_vector (out,)."""

    def __init__(self, rank: int, in_features: int, out_features: int, dora: bool, dtype: torch.dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype)) if dora else None


class LinearAdapter(nn.Module):
    """The adapter of one base linear layer: its parts plus how their outputs are laid out.

    `layout` is a LongTensor over the base layer's local output rows: the index of each row in
    cat(targeted parts' rows..., [one filler]); rows of parts not targeted point at the filler (0 in B,
    1 in DoRA's scale), so partially targeted fused layers stay exact."""

    def __init__(self, parallel: str, part_rows: dict[str, int], targeted: tuple[str, ...], in_features: int,
                 transform: Transform, dims: Dims, rank: int, scaling: float, dropout: float, dora: bool,
                 sequence_parallel: bool, tp_size: int, tp_group, dtype: torch.dtype):
        super().__init__()
        self.parallel, self.scaling, self.dora = parallel, scaling, dora
        self.sequence_parallel, self.tp_size, self.tp_group = sequence_parallel, tp_size, tp_group
        self.part_rows, self.targeted, self.transform, self.dims = part_rows, targeted, transform, dims
        self.enabled = True  # adapters_disabled() turns it off: the layer then runs as the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for name in targeted:
            self.add_module(name, AdapterPart(rank, in_features, part_rows[name], dora, dtype))
        self._mark_parallel_attributes()
        offsets, filler = {}, 0
        for name in targeted:
            offsets[name], filler = filler, filler + part_rows[name]
        pieces = [torch.arange(offsets[n], offsets[n] + rows) if n in offsets else torch.full((rows,), filler)
                  for n, rows in part_rows.items()]
        total = sum(part_rows.values())
        layout = pieces[0] if len(pieces) == 1 else transform.to_mcore(pieces, dims, (total,))
        self.register_buffer("layout", layout, persistent=False)
        self.identity_layout = len(pieces) == 1 and filler == total

    def parts(self) -> list[tuple[str, AdapterPart]]:
        return [(name, getattr(self, name)) for name in self.targeted]

    def _mark_parallel_attributes(self) -> None:
        """Which factors megatron-core treats as TP-sharded (gradient norm, checkpoints) and which
        replicated ones need their gradient summed over TP (sequence parallelism)."""
        for _, part in self.parts():
            sharded = [part.lora_B] + ([part.magnitude] if self.dora else []) if self.parallel == "column" \
                else [part.lora_A]
            replicated = [part.lora_A] if self.parallel == "column" else \
                [part.lora_B] + ([part.magnitude] if self.dora else [])
            for p in sharded:
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=1 if self.parallel == "row" else 0,
                                                     stride=1)
            for p in replicated:
                p.sequence_parallel = self.sequence_parallel

    # --- forward ------------------------------------------------------------------------------------
    def _place(self, pieces: list[torch.Tensor], filler: float) -> torch.Tensor:
        """Per-row tensors of the parts (dim 0: a part's rows) in the base layer's local output row order;
        used on parameter-sized tensors only (B, DoRA's scale), never on activations."""
        if self.identity_layout:
            return pieces[0]
        fill = pieces[0].new_full((1, *pieces[0].shape[1:]), filler)
        return torch.cat(pieces + [fill], dim=0).index_select(0, self.layout)

    def placed_b(self) -> torch.Tensor:
        """Every part's B as one [local output rows, parts * r] matrix in the base layer's output layout:
        part i's B in its own rows and columns i*r:(i+1)*r, zeros elsewhere (and in the rows of parts not
        targeted). h @ placed_b().T is then the fused layer's LoRA output already in place: one matmul
        into the output instead of per-part outputs concatenated and reordered at activation size."""
        bs = [part.lora_B for _, part in self.parts()]
        return self._place([torch.block_diag(*bs) if len(bs) > 1 else bs[0]], 0.0)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """h = x A^T for every part, [s, b, parts*r], made whole (over TP, and SP's sequence shards)."""
        a = torch.cat([part.lora_A for _, part in self.parts()], dim=0)
        h = torch.matmul(x, a.t())
        if self.tp_size == 1:
            return h
        if self.parallel == "column":
            if self.sequence_parallel:
                return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
            return copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(h, group=self.tp_group)

    @torch.no_grad()
    def weight_norms(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per part: the row norms of W + scale * B A over the whole input (detached, as PEFT)."""
        rows = self.transform.to_hf(weight, self.dims) if not self.identity_layout else [weight]
        by_name = dict(zip(self.part_rows, rows))
        norms = {}
        for name, part in self.parts():
            w = by_name[name] + self.scaling * (part.lora_B @ part.lora_A).to(weight.dtype)
            squares = w.float().pow(2).sum(dim=1)
            if self.parallel == "row" and self.tp_size > 1:
                torch.distributed.all_reduce(squares, group=self.tp_group)
            norms[name] = squares.sqrt().to(weight.dtype)
        return norms

    @torch.no_grad()
    def reset_magnitudes(self, weight: torch.Tensor) -> None:
        """DoRA's initial magnitude, as PEFT: the row norms of W + scale * B A (of W alone while B is 0)."""
        for name, norm in self.weight_norms(weight).items():
            getattr(self, name).magnitude.copy_(norm)

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        # Recomputed every micro-batch on purpose: the norms follow A and B, and megatron-core updates
        # them through its parameter buffer (the distributed optimizer's all-gather, `.data` copies),
        # which leaves their `_version` unchanged, so a cache keyed on versions goes stale at DP > 1.
        norms = self.weight_norms(weight)
        return self._place([part.magnitude / norms[name] for name, part in self.parts()], 1.0)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return x
        if self.tp_size > 1 and (self.parallel == "row" or self.sequence_parallel):
            # The input differs between TP ranks (input-dim or sequence shards): each rank's mask comes from
            # megatron's per-TP-rank RNG stream, as megatron's own dropout in such regions does.
            with get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)  # replicated input: the shared default generator gives every rank the same mask

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, added_bias, base_linear, weight) -> torch.Tensor:
        """The adapted layer's output from the base's. `added_bias`: the bias the base added into its
        output (None if none or skipped); `base_linear(x)` re-runs the base (DoRA with dropout needs
        W applied to the dropped-out input, as PEFT does). The scaled low-rank term is added to the base
        output by one addmm, its per-row factors (scaling, DoRA's m / ||W + s B A||) folded into B."""
        dropped = self._drop(x)
        h = self.low_rank(dropped)
        b = self.placed_b()
        if not self.dora:
            return _plus_matmul(base_output, h, b * self.scaling)
        scale = self.dora_scale(weight)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = base_output if added_bias is None else base_output - added_bias
        else:
            base = base_linear(dropped)
        return _plus_matmul(base_output + (scale - 1) * base, h, b * (scale * self.scaling).unsqueeze(1))

    # --- checkpoints --------------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Global shapes: B and magnitude split by rows at column-parallel, A by columns at row-parallel;
        replicated factors declared as such (so dist_checkpointing stores global tensors)."""
        groups = {} if metadata is None or "dp_cp_group" not in metadata else \
            {"tp_group": self.tp_group, "dp_cp_group": metadata["dp_cp_group"]}
        out = {}
        for name, part in self.parts():
            for leaf, tensor in (("lora_A", part.lora_A), ("lora_B", part.lora_B), ("magnitude", part.magnitude)):
                if tensor is None:
                    continue
                key = f"{prefix}{name}.{leaf}"
                sharded_axis = {"column": {"lora_B": 0, "magnitude": 0}, "row": {"lora_A": 1}}[self.parallel]
                if leaf in sharded_axis:
                    out[key] = make_tp_sharded_tensor_for_checkpoint(
                        tensor, key, sharded_axis[leaf], prepend_offsets=sharded_offsets, **groups)
                else:
                    out[key] = make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=sharded_offsets,
                                                                  **groups)
        return out


def _plus_matmul(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y + h @ b.T over the last dim, as one addmm (no separate activation-sized product)."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return out.view(y.shape)


class _AdaptedLinear:
    """Mixed into megatron-core's linear classes (the instance's class is swapped in place, so its
    weights, names and isinstance checks stay megatron's): the base output plus the adapter's."""
    adapter: LinearAdapter

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.adapter.enabled:
            return output, bias
        added_bias = self.bias if (self.bias is not None and not self.skip_bias_add) else None
        return self.adapter(input_, output, added_bias, self._base_without_bias, self.weight), bias

    def _base_without_bias(self, x):
        output, _ = super().forward(x)
        if self.bias is not None and not self.skip_bias_add:
            output = output - self.bias
        return output

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        base = {k: v for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
                if not k.startswith(f"{prefix}adapter.")}
        return {**base, **self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata)}


class AdaptedColumnParallelLinear(_AdaptedLinear, ColumnParallelLinear):
    pass


class AdaptedRowParallelLinear(_AdaptedLinear, RowParallelLinear):
    pass
