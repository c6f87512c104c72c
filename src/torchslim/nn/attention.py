"""``PrunedMultiheadAttention``: ``nn.MultiheadAttention`` with separate q/k/v/out projections, so that it can
hold any number of heads (its inner width ``num_heads * head_dim`` no longer has to equal ``embed_dim``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedMultiheadAttention"]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed to attend) as an additive float mask, as nn.MultiheadAttention does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _pad_last(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention computing what ``nn.MultiheadAttention`` computes (same forward arguments and
    results), with ``num_heads`` heads of width ``head_dim``: q/k/v projections ``embed_dim`` (``kdim``,
    ``vdim``) -> ``num_heads * head_dim`` and an output projection back to ``out_dim`` (``embed_dim`` by
    default). Structured pruning swaps an ``nn.MultiheadAttention`` for one of these when it removes heads."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, out_dim: int | None = None, bias: bool = True, add_bias_kv: bool = False,
                 add_zero_attn: bool = False, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.out_dim, self.has_bias = out_dim or embed_dim, bias
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, self.out_dim, bias=bias)
        self.bias_k = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None

    def resized(self) -> None:
        """Read the sizes back from the projections, after their tensors were sliced."""
        self.num_heads = self.q_proj.weight.shape[0] // self.head_dim
        self.embed_dim, self.kdim, self.vdim = (p.weight.shape[1] for p in (self.q_proj, self.k_proj, self.v_proj))
        self.out_dim = self.out_proj.weight.shape[0]

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """The equivalent of ``mha``, sharing nothing with it. Its tensors may already have been sliced to fewer
        heads (rows of the in-projections, columns of ``out_proj``) or fewer output channels (rows of ``out_proj``)."""
        if mha.in_proj_weight is not None:
            wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
        bias = mha.in_proj_bias is not None
        new = cls(wq.shape[1], wq.shape[0] // mha.head_dim, mha.head_dim, kdim=wk.shape[1], vdim=wv.shape[1],
                  out_dim=mha.out_proj.out_features, bias=bias, add_bias_kv=mha.bias_k is not None,
                  add_zero_attn=mha.add_zero_attn, dropout=mha.dropout, batch_first=mha.batch_first)
        new = new.to(device=wq.device, dtype=wq.dtype)
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None,) * 3
        with torch.no_grad():
            for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv), biases):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
            if mha.bias_k is not None:
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, attention weights or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        # As nn.MultiheadAttention: without weights or padding mask, the causal hint replaces the mask itself.
        causal = is_causal and key_padding_mask is None and not need_weights
        attn_mask = None if causal else attn_mask
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, bsz = query.shape[0], query.shape[1]
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (seq, batch, heads * head_dim)
        attn_mask, key_padding_mask = _additive(attn_mask, q.dtype), _additive(key_padding_mask, q.dtype)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        # (seq, batch, inner) -> (batch, heads, seq, head_dim)
        q, k, v = (t.reshape(t.shape[0], bsz, -1, self.head_dim).permute(1, 2, 0, 3) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, self.head_dim))], 2)
            v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, self.head_dim))], 2)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        heads = q.shape[1]
        mask = None
        if attn_mask is not None:
            mask = attn_mask.reshape(bsz, heads, tgt, -1) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(bsz, 1, 1, -1)
            mask = kpm if mask is None else mask + kpm
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout else weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, -1))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights
