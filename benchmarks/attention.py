"""One attention call, forward + backward, per kernel: why ``Attention`` picks what it picks on this device.

    python benchmarks/attention.py [--batch 64] [--heads 4] [--head-dim 64] [--repeats 7] [--device cpu]

Rows: dtype × sequence (65 keys as bench-tiny's ViT, 33 causal as its text decoder) × kernel:
  flash  PyTorch's flash SDPA kernel (``SDPBackend.FLASH_ATTENTION``)
  math   PyTorch's math SDPA kernel (half inputs upcast to fp32 for scores and softmax): the default on CPU in bf16
  half   finealign's ``_half_attention``: scores and softmax kept in bf16 (``model.attn_low_precision``)
ms = median wall time of forward + backward; error = max |output − fp64 reference| (on the unrounded fp32
inputs, so half rows include the inputs' rounding). Kernels are alternated
within each repeat (same run, same machine state).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from finealign.models.layers import _half_attention


def _sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


KERNELS = {"flash": _sdpa(SDPBackend.FLASH_ATTENTION), "math": _sdpa(SDPBackend.MATH),
           "half": lambda q, k, v, causal: _half_attention(q, k, v, None, causal)}


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
    print(f"{'dtype':9s} {'sequence':12s} {'kernel':6s} {'fwd+bwd ms':>10s} {'max error':>10s}")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for L, causal in ((65, False), (33, True)):
            shape = (args.batch, args.heads, L, args.head_dim)
            base = [torch.randn(shape, generator=g) for _ in range(3)]
            ref = F.scaled_dot_product_attention(*(t.double() for t in base), is_causal=causal)
            kernels = {n: f for n, f in KERNELS.items() if not (n == "half" and dtype == torch.float32)}
            times = {n: [] for n in kernels}
            errors = {}
            for r in range(args.repeats + 1):                      # the first round warms up
                for name, fn in kernels.items():
                    q, k, v = (t.to(args.device, dtype).requires_grad_() for t in base)
                    sync()
                    t0 = time.perf_counter()
                    out = fn(q, k, v, causal)
                    out.float().sum().backward()
                    sync()
                    if r:
                        times[name].append(time.perf_counter() - t0)
                    errors[name] = (out.detach().double().cpu() - ref).abs().max().item()
            for name in kernels:
                seq = f"{L}{', causal' if causal else ''}"
                print(f"{str(dtype).replace('torch.', ''):9s} {seq:12s} {name:6s} "
                      f"{statistics.median(times[name]) * 1e3:10.2f} {errors[name]:10.4f}")


if __name__ == "__main__":
    main()
