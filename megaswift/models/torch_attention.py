"""Core attention on torch's own kernels: the `torch` layer spec.

megatron-core's local DotProductAttention materialises the [batch, heads, seq, seq] scores. Without
Transformer Engine (a 276 MB wheel whose torch binding builds from source) the fast path is torch's:
`scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU, a fused kernel on CPU) and,
for packed rows, FlexAttention with a document mask, which skips the blocks where one sample would see
another (the way torchtitan packs). `TorchDotProductAttention` has DotProductAttention's constructor and
forward, so it plugs into megatron-core's local spec as `core_attention` (`with_torch_core_attention`);
everything else in the layer (projections, rope, norms, TP/PP/EP) stays megatron-core's.

What each micro-batch uses:
    no mask, no PackedSeqParams   SDPA, causal                  (pre-training; SFT without packing)
    block-diagonal mask [b,1,s,s] FlexAttention reading the     (SFT packing, `packed_attention="mask"`)
    (True = masked)               mask, on a GPU without dropout;
                                  SDPA with the mask otherwise
    PackedSeqParams (THD)         FlexAttention with document   (one sequence of all tokens)
                                  ids from cu_seqlens on a GPU
                                  without dropout; SDPA with the
                                  dense mask otherwise
FlexAttention has no backward on CPU (torch 2.14 refuses it), hence SDPA with the dense mask there; its
forward runs on CPU, which is how the tests check it against the local attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import is_layer_window_attention

HALF_PRECISION = (torch.float16, torch.bfloat16)


class TorchDotProductAttention(MegatronModule):
    """megatron-core's DotProductAttention, computed by torch's SDPA / FlexAttention kernels.

    query [sq, b, np, hn], key/value [sk, b, ng, hn] (THD: [t, np, hn], [t, ng, hn]) -> [sq, b, np*hn]
    (THD: [t, np*hn]). Grouped-query heads, softmax scale and attention dropout as DotProductAttention;
    `apply_query_key_layer_scaling` is a numerical device of fp16 softmax that cancels out, so it is not
    repeated. `block_masks` is shared by every layer of one model, so a packed micro-batch's FlexAttention
    block mask is built once, not once per layer."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, block_masks: BlockMaskCache | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, name: str | None = None):
        # k_channels / v_channels / name: what multi-latent attention passes (q/k and v head dims differ
        # there); SDPA and FlexAttention take any head dims, and the output is sized from the tensors.
        super().__init__(config=config)
        refuse_unsupported(config, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.block_masks = block_masks if block_masks is not None else BlockMaskCache()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("the torch layer spec does not support an attention bias; use model.layer_spec=local")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise ValueError(f"the torch layer spec takes PackedSeqParams only with qkv_format='thd', found "
                             f"{packed_seq_params.qkv_format!r}")
        # [s, b, n, h] -> [b, n, s, h] (THD: [t, n, h] -> [1, n, t, h])
        q, k, v = (x.unsqueeze(1) if thd else x for x in (query, key, value))
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        dropout = self.dropout_p if self.training else 0.0
        if thd:
            context = self._attend_documents(q, k, v, packed_seq_params, dropout)
        elif attention_mask is not None:
            context = self._attend_masked(q, k, v, attention_mask, dropout)
        else:
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and q.size(2) > 1
            if causal and q.size(2) != k.size(2):
                raise ValueError(f"the torch layer spec's causal attention needs as many queries as keys "
                                 f"(found {q.size(2)} and {k.size(2)}) or a single query")
            context = self._sdpa(q, k, v, None, causal, dropout)
        # [b, n, s, h] -> [s, b, n*h] (THD: [t, n*h])
        context = context.permute(2, 0, 1, 3)
        context = context.reshape(*context.shape[:2], -1)
        return context[:, 0] if thd else context

    def _attend_masked(self, q, k, v, attention_mask, dropout):
        """A boolean mask, True = masked, [b or 1, 1, sq, sk] (megaswift's packed rows: block-diagonal causal)."""
        if use_flex_attention(q, dropout):
            block_mask = self.block_masks.get(attention_mask, lambda: dense_block_mask(attention_mask))
            return flex(q, k, v, block_mask, self.softmax_scale)
        return self._sdpa(q, k, v, ~attention_mask, False, dropout)

    def _attend_documents(self, q, k, v, params, dropout):
        """THD: one sequence of all tokens, causal inside each segment of cu_seqlens."""
        if params.cu_seqlens_q is not params.cu_seqlens_kv and not torch.equal(params.cu_seqlens_q,
                                                                               params.cu_seqlens_kv):
            raise ValueError("the torch layer spec's THD attention needs cu_seqlens_q == cu_seqlens_kv "
                             "(self-attention over packed samples)")
        cu_seqlens, tokens = params.cu_seqlens_q, q.size(2)
        if use_flex_attention(q, dropout):
            block_mask = self.block_masks.get(cu_seqlens, lambda: document_block_mask(cu_seqlens, tokens))
            return flex(q, k, v, block_mask, self.softmax_scale)
        documents = document_ids(cu_seqlens, tokens, q.device)
        visible = causal_document_mask(documents, documents)
        return self._sdpa(q, k, v, visible[None, None], False, dropout)

    def _sdpa(self, q, k, v, visible, causal, dropout):
        if not gqa_in_kernel(q, visible) and q.size(1) != k.size(1):
            # Kernels that take grouped K/V heads only in some backends: repeat them, as DotProductAttention does.
            k, v = (x.repeat_interleave(q.size(1) // k.size(1), dim=1) for x in (k, v))
        call = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=visible, dropout_p=dropout,
                                 is_causal=causal, scale=self.softmax_scale, enable_gqa=q.size(1) != k.size(1))
        if dropout and not self.config.sequence_parallel:
            # Heads differ per TP rank, so dropout draws from the model-parallel RNG stream (as megatron-core).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return call()
        return call()


def refuse_unsupported(config, layer_number: int) -> None:
    """What megatron-core's other attentions do and this one does not: a clear error at build time."""
    problems = []
    if config.context_parallel_size != 1:
        problems.append(f"context_parallel_size={config.context_parallel_size} (needs Transformer Engine: "
                        f"model.layer_spec=te, or parallel.context=1)")
    if config.softmax_type != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r} (only 'vanilla')")
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        problems.append(f"window_size={config.window_size} (sliding-window attention)")
    if problems:
        raise ValueError("the torch layer spec does not support " + "; ".join(problems) +
                         "; use model.layer_spec=local or te")


def use_flex_attention(q: torch.Tensor, dropout: float) -> bool:
    """FlexAttention where it trains (a GPU: torch has no CPU backward for it) and no dropout is asked for
    (it has none); SDPA with the dense mask elsewhere."""
    return q.is_cuda and not dropout


def gqa_in_kernel(q: torch.Tensor, visible: torch.Tensor | None) -> bool:
    """Whether SDPA can take fewer K/V heads than query heads without falling back to its unfused math
    kernel: the flash kernels (a GPU, half precision, no explicit mask) and the CPU kernels do."""
    return (not q.is_cuda) or (visible is None and q.dtype in HALF_PRECISION)


def document_ids(cu_seqlens: torch.Tensor, tokens: int, device) -> torch.Tensor:
    """[tokens] index of each token's segment of cu_seqlens (0, 0, 0, 1, 1, 2, ...)."""
    positions = torch.arange(tokens, device=device)
    return torch.searchsorted(cu_seqlens[1:-1].to(device=device, dtype=torch.int64), positions, right=True)


def causal_document_mask(query_documents: torch.Tensor, key_documents: torch.Tensor) -> torch.Tensor:
    """[sq, sk] bool, True = attended: keys at or before the query, in the query's document."""
    sq, sk = query_documents.numel(), key_documents.numel()
    causal = torch.ones(sq, sk, dtype=torch.bool, device=query_documents.device).tril()
    return causal & (query_documents[:, None] == key_documents[None, :])


def document_block_mask(cu_seqlens: torch.Tensor, tokens: int):
    """FlexAttention block mask for THD tokens: causal inside each segment of cu_seqlens."""
    from torch.nn.attention.flex_attention import create_block_mask
    documents = document_ids(cu_seqlens, tokens, cu_seqlens.device)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (documents[q_idx] == documents[kv_idx])
    return create_block_mask(same_document_causal, None, None, tokens, tokens, device=cu_seqlens.device,
                             _compile=cu_seqlens.is_cuda)


def dense_block_mask(attention_mask: torch.Tensor):
    """FlexAttention block mask that reads a boolean mask [b or 1, 1, sq, sk], True = masked. Blocks masked
    throughout (one sample against another) are skipped; the mask is read only inside partial blocks."""
    from torch.nn.attention.flex_attention import create_block_mask
    visible = ~attention_mask[:, 0]
    batch = visible.size(0)

    def read_mask(b, h, q_idx, kv_idx):
        return visible[b if batch > 1 else 0, q_idx, kv_idx]
    return create_block_mask(read_mask, batch if batch > 1 else None, None, visible.size(1), visible.size(2),
                             device=attention_mask.device, _compile=attention_mask.is_cuda)


def flex(q, k, v, block_mask, scale: float):
    attend = compiled_flex_attention() if q.is_cuda else eager_flex_attention()
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


def eager_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention


@functools.cache
def compiled_flex_attention():
    """FlexAttention's fused kernels exist only compiled; uncompiled it materialises the scores."""
    return torch.compile(eager_flex_attention(), dynamic=False)


class BlockMaskCache:
    """The block mask of the last mask tensor (or cu_seqlens) seen, shared by the layers of one model: every
    layer of a micro-batch gets the same tensor, so the block mask is built once per micro-batch. Keyed on
    the tensor object itself (a weak reference and its in-place version counter), never on its address."""

    def __init__(self):
        self._key, self._version, self._block_mask = None, None, None

    def get(self, tensor: torch.Tensor, build):
        if self._key is None or self._key() is not tensor or self._version != tensor._version:
            self._key, self._version, self._block_mask = weakref.ref(tensor), tensor._version, build()
        return self._block_mask


def with_torch_core_attention(spec):
    """megatron-core's local layer spec (one ModuleSpec, or a TransformerBlockSubmodules of per-layer specs)
    with its DotProductAttention replaced by TorchDotProductAttention; a new spec, the given one untouched.
    One BlockMaskCache serves all the layers of the model built from it."""
    core = ModuleSpec(module=TorchDotProductAttention, params={"block_masks": BlockMaskCache()})
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[_replace_core(s, core) for s in spec.layer_specs])
    return _replace_core(spec, core)


def _replace_core(layer_spec, core):
    attention = layer_spec.submodules.self_attention
    found = getattr(attention.submodules, "core_attention", None)
    # Subclasses too: megaswift's MlaDotProductAttention (families/mla_attention.py) only resizes the output.
    if not (isinstance(found, type) and issubclass(found, DotProductAttention)):
        raise ValueError(f"the torch layer spec replaces megatron-core's DotProductAttention, but this model's "
                         f"layers use {getattr(found, '__name__', found)!r}; use model.layer_spec=local or te")
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                            core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                        self_attention=attention))
