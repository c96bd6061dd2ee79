"""Next-token cross-entropy over a large vocabulary without fp32 copies of the logits.

``token_cross_entropy(logits (..., V), labels (...))`` equals
``F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100,
label_smoothing=eps)`` (mean over the labelled positions; NaN when there is none) in value and gradient,
but works on the logits as they come (bf16 under autocast) in row chunks:

    forward   per chunk of labelled rows: x = rows in fp32; lse = logsumexp(x); loss_i = (1-eps)(lse - x[y])
              + eps (lse - mean x)                       -> saves the logits (not a copy) and lse (N,)
    backward  per chunk: grad = (exp(x - lse) - (1-eps) onehot(y) - eps / V) * g / n, written in the
              logits' dtype; unlabelled rows get 0

The caption heads' logits are (B, T, V) with V = 8192 or more: the usual path (``.float()``, slice off
the last position, log_softmax, NLL, and their backward) copies or fills that whole tensor about eight
times in fp32; on the 2-core CPU that was a quarter of a bf16 CoCa step (docs/performance.md). Here each
element is read twice forward and backward and the gradient written once.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_cross_entropy", "IGNORE"]

IGNORE = -100
CPU_CHUNK_ELEMENTS = 1 << 21         # fp32 elements per chunk: ~8 MB on CPU (cache-sized buffers)
GPU_CHUNK_ELEMENTS = 1 << 25         # ~128 MB elsewhere: fewer, larger kernels


def _buffers(logits: Tensor, rows: int, work: torch.dtype) -> tuple[Tensor | None, Tensor]:
    """Chunk buffers reused across chunks (a fresh multi-MB tensor per chunk costs page faults on CPU):
    the selected rows in the logits' dtype (None when that is already the working dtype) and in ``work``."""
    V = logits.shape[1]
    sel = None if logits.dtype == work else logits.new_empty(rows, V)
    return sel, logits.new_empty(rows, V, dtype=work)


def _select(logits: Tensor, r: Tensor, sel: Tensor | None, w: Tensor) -> Tensor:
    """Rows ``r`` of ``logits`` in the working dtype, written into the buffers."""
    c = len(r)
    if sel is None:
        return torch.index_select(logits, 0, r, out=w[:c])
    torch.index_select(logits, 0, r, out=sel[:c])
    return w[:c].copy_(sel[:c])


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, smoothing: float, chunk: int) -> Tensor:
        V = logits.shape[1]
        rows = (labels != IGNORE).nonzero().squeeze(1)
        n = rows.numel()
        work = torch.promote_types(logits.dtype, torch.float32)
        sel, w = _buffers(logits, min(chunk, n), work)
        lse = torch.empty(n, dtype=work, device=logits.device)
        total = torch.zeros((), dtype=work, device=logits.device)
        for s in range(0, n, chunk):
            r = rows[s: s + chunk]
            x = _select(logits, r, sel, w)                                 # (c, V) in the working dtype
            target = x.gather(1, labels[r].unsqueeze(1)).squeeze(1)
            mean = x.mean(1) if smoothing else None
            mx = x.amax(1, keepdim=True)
            lse_c = x.sub_(mx).exp_().sum(1).log_().add_(mx.squeeze(1))    # x is overwritten
            lse[s: s + chunk] = lse_c
            nll = lse_c - target
            if smoothing:
                nll = (1 - smoothing) * nll + smoothing * (lse_c - mean)
            total += nll.sum()
        ctx.save_for_backward(logits, labels, rows, lse)
        ctx.smoothing, ctx.chunk, ctx.V = smoothing, chunk, V
        return total / n                                                   # 0/0 = NaN, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, rows, lse = ctx.saved_tensors
        eps, chunk, n = ctx.smoothing, ctx.chunk, rows.numel()
        grad = torch.empty_like(logits)
        grad.index_fill_(0, (labels == IGNORE).nonzero().squeeze(1), 0)   # unlabelled rows only
        scale = grad_out.to(lse.dtype) / n
        sel, w = _buffers(logits, min(chunk, n), lse.dtype)
        for s in range(0, n, chunk):
            r = rows[s: s + chunk]
            p = _select(logits, r, sel, w).sub_(lse[s: s + chunk, None]).exp_()     # softmax
            p.scatter_add_(1, labels[r].unsqueeze(1),
                           torch.full((len(r), 1), eps - 1.0, dtype=p.dtype, device=p.device))
            if eps:
                p.sub_(eps / ctx.V)
            p.mul_(scale)
            if sel is None:
                grad.index_copy_(0, r, p)
            else:
                grad.index_copy_(0, r, sel[: len(r)].copy_(p))
        return grad, None, None, None


def token_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                        chunk_rows: int = 0) -> Tensor:
    """Mean cross-entropy of ``logits`` (..., V) against ``labels`` (...) (``IGNORE`` = not scored).

    ``chunk_rows``: rows per chunk (0: about 8 MB of fp32 each on CPU, 128 MB on a GPU). See the module
    docstring."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on the "
                         f"positions")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    V = logits.shape[-1]
    budget = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    chunk = chunk_rows or max(1, budget // V)
    return _TokenCrossEntropy.apply(logits.reshape(-1, V), labels.reshape(-1), float(label_smoothing), chunk)
