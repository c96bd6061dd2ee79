"""Where a training step's time goes: torch.profiler over a few synthetic steps, top operators.

    python benchmarks/profile_step.py --preset bench-tiny --recipe coca [--bf16] [--device cuda] [--trace t.json]

Prints the operators with the most self time (device time on CUDA, CPU time otherwise) and the share
of the step spent in matrix products (mm / addmm / bmm / linear backward / attention kernels), which
bounds what MFU can reach. ``--trace`` writes a Chrome trace (chrome://tracing, Perfetto).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMUL = ("mm", "addmm", "bmm", "matmul", "linear", "gemm", "sdpa", "attention", "flash", "cutlass", "sm90", "xmma")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="coca")
    ap.add_argument("--preset", default="bench-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--trace", help="write a Chrome trace here")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    import train_step

    captured = {}

    def grab(step, steps, warmup, batch, device="cpu"):
        captured["step"] = step
        return {}
    train_step._time = grab                       # build exactly what train_step times, then profile it
    train_step.run_finealign(args.recipe, args.preset, args.batch, args.bf16, 0, 0, args.set, args.device)
    step = captured["step"]
    cuda = torch.device(args.device).type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    mm = sum(getattr(e, key) for e in events if any(k in e.key.lower() for k in MATMUL))
    print(events.table(sort_by=key, row_limit=args.top))
    print(f"{args.recipe} {args.preset} batch {args.batch} {'bf16' if args.bf16 else 'fp32'} on {args.device}: "
          f"{total / 1e3 / args.steps:.1f} ms self {'device' if cuda else 'CPU'} time per step, "
          f"{mm / max(total, 1):.0%} in matrix products / attention kernels")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
