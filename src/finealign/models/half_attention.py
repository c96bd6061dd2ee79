"""Attention for half-precision (bf16 / fp16) inputs on CPU, where PyTorch's own kernels are a poor fit.

At the sequence lengths of these models (tens of tokens, head dim 64) PyTorch's CPU flash kernel is 2-3x
slower than its math kernel in bf16, and the math kernel upcasts q, k, v to fp32 and keeps those copies and
the fp32 attention weights for backward (benchmarks/attention.py). Two replacements:

* ``fp32_softmax_attention`` (the default on CPU in half precision): the math kernel's forward (scores,
  softmax and value product in fp32, the output rounded to the inputs' dtype), with a hand-written backward
  that keeps only q, k, v (contiguous), the output and the probabilities in the inputs' dtype: no fp32 copy.
* ``half_attention`` (``model.attn_low_precision``): scores and softmax in the inputs' dtype, plain autograd.

Masks: bool, broadcastable to (B, H, L, S), True = may attend; ``is_causal`` applies the top-left causal
mask instead. A query whose keys are all masked gets 0 (as SDPA) and no gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) written out, in q's dtype (a query with no key: NaN)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))              # (..., L, S)
    allowed = _allowed(q, k, mask, is_causal)
    if allowed is not None:
        att = att.masked_fill(~allowed, float("-inf"))
    return att.softmax(dim=-1)


def _allowed(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """The keys each query may attend to (bool, True = may), or None for all: the top-left causal mask when
    ``is_causal``, else ``mask``."""
    if is_causal:
        return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return mask


def half_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the scores and softmax kept in q's (half) precision: what PyTorch's
    math SDPA kernel computes under ``allow_fp16_bf16_reduction_math_sdp``, without that process-global flag."""
    att = attention_weights(q, k, mask, is_causal)
    if mask is not None and not is_causal:
        att = att.nan_to_num(0.0)                          # a query with no key: 0, not NaN (no data-dependent branch)
    return att @ v


def _fp32(t: Tensor) -> Tensor:
    """An fp32 copy laid out contiguously (``.float()`` keeps a view's strides: matmul then copies again)."""
    return t.to(torch.float32, memory_format=torch.contiguous_format)


class _FP32SoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        if any(ctx.needs_input_grad[:3]):
            # contiguous copies of the (permuted) projections, saved instead of them: the conversions below and the
            # backward's products then read them directly (3-9% faster per call), and the projections are freed
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with torch.autocast(q.device.type, enabled=False):
            scale = 1.0 / math.sqrt(q.shape[-1])
            scores = torch.matmul(_fp32(q), _fp32(k).transpose(-2, -1)).mul_(scale)   # (..., L, S)
            allowed = _allowed(q, k, mask, is_causal)
            if allowed is not None:
                scores.masked_fill_(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if mask is not None and not is_causal:
                probs.nan_to_num_(0.0)                     # a query with no key: 0, not NaN (no data-dependent branch)
            out = torch.matmul(probs, _fp32(v)).to(q.dtype)
            probs = probs.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, probs)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, probs = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(q.dtype, memory_format=torch.contiguous_format)
            grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
            # d scores = P * (dP - rowsum(dO * O)) (softmax backward), dP = dO v^T; in fp32, then half for the products
            go = _fp32(grad_out)
            grad_p = torch.matmul(go, _fp32(v).transpose(-2, -1))
            delta = out.float().mul_(go).sum(-1, keepdim=True)
            grad_s = grad_p.sub_(delta).mul_(probs).mul_(ctx.scale).to(q.dtype)
            grad_q = torch.matmul(grad_s, k)
            grad_k = torch.matmul(grad_s.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, None, None


def fp32_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for half-precision q, k, v (..., L, Dh) / (..., S, Dh), computed in fp32;
    saves no fp32 tensor for backward (its gradient uses the probabilities rounded to q's dtype)."""
    return _FP32SoftmaxAttention.apply(q, k, v, mask, is_causal)
