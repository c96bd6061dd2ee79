"""Next-token cross-entropy over a large vocabulary without fp32 copies of the logits.

``token_cross_entropy(logits (..., V), labels (...))`` equals
``F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100,
label_smoothing=eps)`` (mean over the labelled positions; NaN when there is none) in value and gradient,
but works on the logits as they come (bf16 under autocast) in row chunks:

    forward   per chunk of consecutive rows: x = rows in fp32; lse = logsumexp(x); loss_i = (1-eps)(lse - x[y])
              + eps (lse - mean x), summed over the labelled rows -> saves the logits (not a copy) and lse
    backward  per chunk: grad = (exp(x - lse) - (1-eps) onehot(y) - eps / V) * g / n, written in the
              logits' dtype; unlabelled rows get 0

Chunks are contiguous row ranges (slice copies; gathering only the labelled rows with index_select /
index_copy_ was 8x slower per byte on CPU); a chunk without any labelled row is skipped.

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


def _plan(labels: Tensor, chunk: int) -> tuple[Tensor, dict[int, Tensor]]:
    """Where the labels say what to score: the mask of scored rows, and for every row chunk that scores
    at least one row, its start -> its unscored rows (chunk-relative). One host sync."""
    N = labels.numel()
    valid = labels != IGNORE
    starts = list(range(0, N, chunk))
    unscored = (~valid).nonzero().squeeze(1)
    cut = torch.searchsorted(unscored, torch.tensor(starts + [N], device=labels.device)).tolist()
    live = {s: unscored[cut[i]: cut[i + 1]] - s for i, s in enumerate(starts)
            if cut[i + 1] - cut[i] < min(chunk, N - s)}
    return valid, live


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, smoothing: float, chunk: int) -> Tensor:
        N, V = logits.shape
        valid, live = _plan(labels, chunk)
        targets = labels.masked_fill(~valid, 0)                            # any index for unscored rows
        work = torch.promote_types(logits.dtype, torch.float32)
        w = logits.new_empty(min(chunk, N), V, dtype=work)                 # reused: cache-sized, no page faults
        lse = logits.new_zeros(N, dtype=work)
        total = torch.zeros((), dtype=work, device=logits.device)
        for s in live:
            e = min(s + chunk, N)
            x = w[: e - s].copy_(logits[s:e])                              # (c, V) in the working dtype
            target = x.gather(1, targets[s:e, None]).squeeze(1)
            mean = x.mean(1) if smoothing else None
            mx = x.amax(1, keepdim=True)
            lse_c = x.sub_(mx).exp_().sum(1).log_().add_(mx.squeeze(1))    # x is overwritten
            lse[s:e] = lse_c
            nll = lse_c - target
            if smoothing:
                nll = (1 - smoothing) * nll + smoothing * (lse_c - mean)
            total += torch.where(valid[s:e], nll, 0).sum()
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.smoothing, ctx.chunk, ctx.live = smoothing, chunk, live
        return total / valid.sum()                                         # 0/0 = NaN, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, targets, valid, lse = ctx.saved_tensors
        eps, chunk = ctx.smoothing, ctx.chunk
        N, V = logits.shape
        grad = torch.empty_like(logits)
        scale = grad_out.to(lse.dtype) / valid.sum()
        in_place = logits.dtype == lse.dtype                              # fp32: work in the gradient itself
        w = None if in_place else logits.new_empty(min(chunk, N), V, dtype=lse.dtype)
        live = ctx.live
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            if s not in live:                                              # nothing scored in these rows
                grad[s:e].zero_()
                continue
            p = (grad[s:e] if in_place else w[: e - s]).copy_(logits[s:e])
            p.sub_(lse[s:e, None]).exp_()                                  # softmax
            p.scatter_add_(1, targets[s:e, None], (eps - 1.0) * valid[s:e, None].to(p.dtype))
            if eps:
                p.sub_(eps / V)
            p.mul_(scale).index_fill_(0, live[s], 0)                       # unscored rows: 0
            if not in_place:
                grad[s:e].copy_(p)
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
