"""One attention call, forward + backward, per kernel: why ``Attention`` picks what it picks on this device.

    python benchmarks/attention.py [--batch 64] [--heads 4] [--head-dim 64] [--repeats 7] [--device cpu]

Rows: dtype × sequence (65 keys as bench-tiny's ViT, 33 causal as its text decoder) × kernel:
  flash  PyTorch's flash SDPA kernel (``SDPBackend.FLASH_ATTENTION``)
  math   PyTorch's math SDPA kernel (half inputs upcast to fp32 for scores and softmax, fp32 copies kept)
  fp32sm finealign's ``fp32_softmax_attention``: the math forward, bf16 probabilities saved, hand-written
         backward (the default on CPU in bf16)
  half   finealign's ``half_attention``: scores and softmax kept in bf16 (``model.attn_low_precision``)
ms = median wall time of forward + backward; error = max |output − fp64 reference| (on the unrounded fp32
inputs, so half rows include the inputs' rounding); grad error = max over q, k, v of max |grad − fp64 grad|
/ max |fp64 grad|; saved MB = what autograd keeps for backward. Kernels are alternated
within each repeat (same run, same machine state).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finealign.models.half_attention import fp32_softmax_attention, half_attention


def _sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


KERNELS = {"flash": _sdpa(SDPBackend.FLASH_ATTENTION), "math": _sdpa(SDPBackend.MATH),
           "fp32sm": lambda q, k, v, causal: fp32_softmax_attention(q, k, v, None, causal),
           "half": lambda q, k, v, causal: half_attention(q, k, v, None, causal)}
HALF_ONLY = ("fp32sm", "half")


def _saved_bytes(fn, *args):
    """Bytes of the distinct tensors autograd saves for backward during fn(*args); returns (out, bytes)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    print(f"device={args.device} batch={args.batch} heads={args.heads} head_dim={args.head_dim} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'dtype':9s} {'sequence':12s} {'kernel':6s} {'fwd+bwd ms':>10s} {'max error':>10s} "
          f"{'grad error':>10s} {'saved MB':>9s}")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for L, causal in ((65, False), (33, True)):
            shape = (args.batch, args.heads, L, args.head_dim)
            base = [torch.randn(shape, generator=g) for _ in range(3)]
            grad = torch.randn(shape, generator=g)
            ref_in = [t.double().requires_grad_() for t in base]
            ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal)
            ref.backward(grad.double())
            kernels = {n: f for n, f in KERNELS.items() if dtype != torch.float32 or n not in HALF_ONLY}
            times = {n: [] for n in kernels}
            errors, saved = {}, {}
            for r in range(args.repeats + 2):    # round 0 warms up, round 1 measures errors and saved bytes
                for name, fn in kernels.items():
                    q, k, v = (t.to(args.device, dtype, copy=True).requires_grad_() for t in base)
                    sync()
                    t0 = time.perf_counter()
                    if r == 1:
                        out, saved[name] = _saved_bytes(fn, q, k, v, causal)
                    else:
                        out = fn(q, k, v, causal)
                    out.backward(grad.to(args.device, dtype))
                    sync()
                    if r > 1:
                        times[name].append(time.perf_counter() - t0)
                    if r == 1:
                        gerr = max((t.grad.double().cpu() - rt.grad).abs().max().item() / rt.grad.abs().max().item()
                                   for t, rt in zip((q, k, v), ref_in))
                        errors[name] = ((out.detach().double().cpu() - ref).abs().max().item(), gerr)
            for name in kernels:
                seq = f"{L}{', causal' if causal else ''}"
                print(f"{str(dtype).replace('torch.', ''):9s} {seq:12s} {name:6s} "
                      f"{statistics.median(times[name]) * 1e3:10.2f} {errors[name][0]:10.4f} "
                      f"{errors[name][1]:10.4f} {saved[name] / 2**20:9.1f}")

if __name__ == "__main__":
    main()
