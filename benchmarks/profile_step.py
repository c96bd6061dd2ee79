"""Where a training step's time goes: torch.profiler over a few synthetic steps, top operators.

    python benchmarks/profile_step.py --preset bench-tiny --recipe coca [--bf16] [--device cuda] [--trace t.json]
    python benchmarks/profile_step.py --preset bench-tiny --recipe semmim --bf16 --phases

Prints the operators with the most self time (device time on CUDA, CPU time otherwise) and the share
of the step spent in matrix products (mm / addmm / bmm / linear backward / attention kernels), which
bounds what MFU can reach. ``--trace`` writes a Chrome trace (chrome://tracing, Perfetto).

``--phases`` skips the profiler and times the step's phases (forward = encoders, maskers, mixer and heads;
objectives; backward; optimizer; EMA update) with wall clocks, and counts each phase's FLOPs: ms, GFLOP and
the phase's share of the matmul peak measured in the same process. On a CPU the profiler's per-operator
times can be far off for small element-wise operators (several times their wall time here), so this is
the check before believing a profile's attribution.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
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
    ap.add_argument("--phases", action="store_true", help="wall time and FLOPs per phase of the step, no profiler")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    import train_step

    captured = {}

    def grab(step, steps, warmup, batch, device="cpu", bf16=False):
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
    if args.phases:
        phases(step, args, train_step)
        return
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


def phases(step, args, train_step) -> None:
    """Median wall time per phase over ``args.steps`` steps; FLOPs per phase from one counted step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    train_step._count_cpu_flash_attention()
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    times, flops, state = defaultdict(list), defaultdict(float), {"t": 0.0, "f": 0.0, "counter": None}

    def mark(phase: str) -> None:                  # called by train_step's step at the end of each phase
        sync()
        now = time.perf_counter()
        times[phase].append(now - state["t"])
        state["t"] = now
        if state["counter"] is not None:
            total = state["counter"].get_total_flops()
            flops[phase] += total - state["f"]
            state["f"] = total

    train_step._mark = mark
    with FlopCounterMode(display=False) as counter:
        state["counter"], state["f"], state["t"] = counter, 0.0, time.perf_counter()
        step()
    state["counter"] = None
    flops["step"] = counter.get_total_flops()
    times.clear()
    for _ in range(args.steps):
        sync()
        state["t"] = start = time.perf_counter()
        step()
        sync()
        times["step"].append(time.perf_counter() - start)
    peak = train_step.matmul_peak(args.bf16, args.device)["tflops"] * 1e12
    parts = [k for k in times if k != "step"]
    times["rest (zero_grad)"] = [t - sum(times[k][i] for k in parts) for i, t in enumerate(times["step"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.recipe} {args.preset} batch {args.batch} {'bf16' if args.bf16 else 'fp32'} on {args.device}, "
          f"median of {args.steps} steps, matmul peak {peak / 1e12:.3f} TFLOP/s")
    print("| phase | ms | share of step | GFLOP | % of peak |")
    print("|---|---:|---:|---:|---:|")
    for k in [k for k in med if k != "step"] + ["step"]:
        f = flops.get(k, 0.0)
        print(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / med['step']:.0%} | {f / 1e9:.1f} | "
              f"{100 * f / max(med[k], 1e-9) / peak:.1f}% |")


if __name__ == "__main__":
    main()
