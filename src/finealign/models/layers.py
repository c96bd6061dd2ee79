"""Transformer building blocks shared by every tower: attention, MLP, pre-LN block, KV cache.

Attention goes through ``F.scaled_dot_product_attention``, except in half precision on CPU (half_attention.py);
the explicit softmax path is only taken when the caller asks for the attention weights (e.g. MacCap's
cls->patch saliency).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .half_attention import attention_weights, fp32_softmax_attention, half_attention


class KVCache:
    """Keys and values of one attention layer for incremental decoding; ``k`` / ``v`` read (B, H, L, Dh).

    Self-attention caches ``append`` the new positions' keys/values into one preallocated buffer
    (capacity, 2, B, H, Dh) (k and v side by side, positions outermost): no ``torch.cat`` copy of the
    whole prefix per step, and the filled prefix ``buf[:L]`` is one contiguous block, so a beam-search
    ``reorder`` is a single ``index_select`` into a second buffer that then takes over (double buffering).
    The capacity (``capacity``, e.g. the context length) grows by doubling if exceeded.
    Cross-attention caches are filled once (``set``) from the fixed memory.
    """

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.k: Tensor | None = None       # (B, H, L, Dh), a view into _buf for appended caches
        self.v: Tensor | None = None
        self._buf: Tensor | None = None    # (capacity, 2, B, H, Dh)
        self._spare: Tensor | None = None  # same shape, target of the next reorder
        self._len = 0

    def __len__(self) -> int:
        return self._len if self._buf is not None else (0 if self.k is None else self.k.shape[2])

    @property
    def filled(self) -> bool:
        return self.k is not None

    def set(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k, self.v, self._buf, self._spare = k, v, None, None
        return k, v

    def _views(self) -> tuple[Tensor, Tensor]:
        filled = self._buf[:self._len]                                   # (L, 2, B, H, Dh)
        self.k = filled[:, 0].permute(1, 2, 0, 3)                       # (B, H, L, Dh) strided view
        self.v = filled[:, 1].permute(1, 2, 0, 3)
        return self.k, self.v

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H, t, Dh) of t new positions -> all cached keys / values (B, H, L+t, Dh)."""
        B, H, t, Dh = k.shape
        if self._buf is None and self.k is not None:
            raise ValueError("this cache holds fixed keys/values (set()); append() is for self-attention")
        L = self._len
        if self._buf is None or L + t > self._buf.shape[0] or self._buf.shape[2:] != (B, H, Dh):
            if self._buf is not None and self._buf.shape[2:] != (B, H, Dh):
                raise ValueError(f"cache holds rows of shape {tuple(self._buf.shape[2:])}, "
                                 f"got keys of shape {(B, H, Dh)}")
            cap = max(self.capacity, L + t, 2 * (self._buf.shape[0] if self._buf is not None else 0))
            buf = k.new_empty(cap, 2, B, H, Dh)
            if L:
                buf[:L] = self._buf[:L]
            self._buf, self._spare = buf, None
        self._buf[L:L + t, 0] = k.permute(2, 0, 1, 3)                     # (t, B, H, Dh)
        self._buf[L:L + t, 1] = v.permute(2, 0, 1, 3)
        self._len = L + t
        return self._views()

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (N,) in that order (beam search: each row follows its beam of origin)."""
        if self._buf is not None:
            L, cap = self._len, self._buf.shape[0]
            if index.numel() == self._buf.shape[2]:
                if self._spare is None:
                    self._spare = torch.empty_like(self._buf)
                torch.index_select(self._buf[:L], 2, index, out=self._spare[:L])
                self._buf, self._spare = self._spare, self._buf
            else:                                                        # the batch changes size
                buf = self._buf.new_empty(cap, 2, index.numel(), *self._buf.shape[3:])
                torch.index_select(self._buf[:L], 2, index, out=buf[:L])
                self._buf, self._spare = buf, None
            self._views()
        elif self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


def reorder_caches(caches, index: Tensor) -> None:
    """Reorder every ``KVCache`` in a (nested) list/tuple/dict of caches."""
    if isinstance(caches, KVCache):
        caches.reorder(index)
    elif isinstance(caches, dict):
        for c in caches.values():
            reorder_caches(c, index)
    elif isinstance(caches, (list, tuple)):
        for c in caches:
            reorder_caches(c, index)


def step_mask(q_len: int, start_pos: int, device: torch.device) -> Tensor | None:
    """Causal mask for ``q_len`` new queries at positions start_pos.. over all start_pos+q_len keys.

    Returns None where no mask is needed (a single new query sees the whole cached prefix).
    """
    if q_len == 1:
        return None
    k_len = start_pos + q_len
    q_pos = torch.arange(start_pos, k_len, device=device)[:, None]  # (t, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]              # (1, L)
    return k_pos <= q_pos                                            # (t, L) True = may attend


def set_low_precision_attention(model: nn.Module, enabled: bool) -> None:
    """``model.attn_low_precision``: every ``Attention`` of ``model`` computes CPU half-precision
    attention scores and softmax in that precision instead of fp32."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.low_precision = bool(enabled)


class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused qkv Linear; cross-attention (``kv_dim`` set)
    projects queries from ``x`` and keys/values from ``context`` (width kv_dim)."""
    low_precision = False       # see set_low_precision_attention

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, cross: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.cross = heads, dim // heads, cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def project_memory(self, context: Tensor, index: Tensor | None = None) -> Tensor:
        """Cross-attention keys and values of ``context`` (Bm, S, Dkv): (2, Bm, H, S, Dh). With ``index``
        (B,) those of the rows ``context[index]``, each distinct row projected once (then gathered)."""
        kv = self.kv(context)                                                     # (Bm, S, 2D)
        if index is not None:
            kv = kv[index]                                                        # (B, S, 2D)
        Bm, S = kv.shape[:2]
        return kv.view(Bm, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None, need_weights: bool = False):
        """x (B, L, D); context (B, S, Dkv) for cross-attention (unused once ``cache`` is filled; its
        batch may be B / g: rows b*g .. b*g+g-1 then share memory row b);
        mask: bool, broadcastable to (B, H, L, S), True = may attend.
        Returns (B, L, D), or ((B, L, D), weights (B, H, L, S)) when need_weights."""
        B, L, D = x.shape
        H, Dh = self.heads, self.head_dim
        if self.cross:
            q = self.q(x).view(B, L, H, Dh).transpose(1, 2)                       # (B, H, L, Dh)
            if cache is not None and cache.filled:
                k, v = cache.k, cache.v
            else:
                k, v = self.project_memory(context)                               # 2 x (Bm, H, S, Dh)
                if cache is not None:
                    cache.set(k, v)
        else:
            q, k, v = self.qkv(x).view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)     # 3 x (B, H, L, Dh)
            if cache is not None:
                k, v = cache.append(k, v)                                         # (B, H, S, Dh)

        Bm, g = k.shape[0], 1
        if Bm != B:
            # memory shared by groups of g consecutive rows (beam search: the K beams of one image attend
            # to that image's memory, cached once): (Bm, H, g*L, Dh) queries over (Bm, H, S, Dh) keys
            if B % Bm or not self.cross:
                raise ValueError(f"{B} query rows do not split into groups over {Bm} memory rows")
            if need_weights or mask is not None:                             # rare: expand the keys
                k, v = k.repeat_interleave(B // Bm, dim=0), v.repeat_interleave(B // Bm, dim=0)
            else:
                g = B // Bm
                q = q.reshape(Bm, g, H, L, Dh).transpose(1, 2).reshape(Bm, H, g * L, Dh)
        if need_weights:  # explicit softmax(q k^T / sqrt(d)) v, only on request
            att = attention_weights(q, k, mask, is_causal)                     # (B, H, L, S)
            y = att.to(v.dtype) @ v
        elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # CPU, half precision: PyTorch's flash kernel is 2-3x slower (forward + backward) than its math kernel
            # at these lengths, and the math kernel keeps fp32 copies of q, k, v and the weights for backward
            # (benchmarks/attention.py); see half_attention.py. fp32 and CUDA keep PyTorch's choice.
            attend = half_attention if self.low_precision else fp32_softmax_attention
            y = attend(q, k, v, mask, is_causal and mask is None)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        if g > 1:                                                                  # (Bm, H, g*L, Dh)
            y = y.view(Bm, H, g, L, Dh).permute(0, 2, 3, 1, 4)                     # (Bm, g, L, H, Dh)
        else:
            y = y.transpose(1, 2)                                                  # (B, L, H, Dh)
        y = self.proj(y.reshape(B, L, D))                                          # (B, L, D)
        return (y, att) if need_weights else y


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# model.act -> MLP activation (names as in Hugging Face configs' ``hidden_act`` where they differ)
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + SelfAttn(LN x) [+ MLP_s(LN x)] [+ CrossAttn(LN x, LN memory)] + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross_dim: int | None = None,
                 self_mlp: bool = False, act: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.self_mlp = self_mlp   # an extra MLP between self- and cross-attention (open_clip's CoCa layout)
        if self_mlp:
            self.ln_s = nn.LayerNorm(dim)
            self.mlp_s = MLP(dim, mlp_ratio, act)
        self.has_cross = cross_dim is not None
        if self.has_cross:
            self.ln_x = nn.LayerNorm(dim)
            self.ln_kv = nn.LayerNorm(cross_dim)
            self.cross_attn = Attention(dim, heads, kv_dim=cross_dim, cross=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, act)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None, cross_cache: KVCache | None = None,
                need_weights: bool = False, cross_mask: Tensor | None = None, cross_gate: Tensor | None = None,
                need_cross_weights: bool = False):
        """x (B, L, D) -> (B, L, D). ``mask`` / ``cross_mask``: bool, True = may attend (self: broadcastable
        to (B, H, L, L), cross: to (B, H, L, S)); ``cross_gate`` (B, 1, 1) scales the cross-attention output
        (0 for rows whose context is all masked). With need_weights also the self-attention weights
        (B, H, L, L); with need_cross_weights the cross-attention weights (B, H, L, S)."""
        a = self.attn(self.ln_1(x), mask=mask, is_causal=is_causal, cache=cache, need_weights=need_weights)
        if need_weights:
            a, weights = a
        x = x + a
        if self.self_mlp:
            x = x + self.mlp_s(self.ln_s(x))
        if self.has_cross:
            ctx = None if (cross_cache is not None and cross_cache.filled) else self.ln_kv(context)
            c = self.cross_attn(self.ln_x(x), context=ctx, mask=cross_mask, cache=cross_cache,
                                need_weights=need_cross_weights)
            if need_cross_weights:
                c, weights = c
            x = x + (c if cross_gate is None else c * cross_gate)
        x = x + self.mlp(self.ln_2(x))
        return (x, weights) if (need_weights or need_cross_weights) else x


def pool_tokens(x: Tensor, mask: Tensor | None, how: str) -> Tensor:
    """Pool token features (``model.text_pool``): x (B, T, D), mask (B, T) bool (True on real tokens,
    a prefix) -> (B, D): cls = token 0, eos = the last real token, mean = masked mean."""
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if how == "cls":
        return x[:, 0]
    if how == "eos":
        last = (mask.long().sum(dim=1) - 1).clamp(min=0)                      # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]
    if how == "mean":
        w = mask.to(x.dtype)[..., None]                                        # (B, T, 1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"model.text_pool must be cls, eos or mean, got {how!r}")


def run_block(block: nn.Module, x: Tensor, use_checkpoint: bool, **kw) -> Tensor:
    """Run one block, recomputing its activations in backward when ``use_checkpoint``."""
    if use_checkpoint:
        return checkpoint(block, x, use_reentrant=False, **kw)
    return block(x, **kw)


def init_weights(module: nn.Module) -> None:
    """Linear / Embedding ~ N(0, 0.02) (truncated for Linear), zero biases, LayerNorm weight 1."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
