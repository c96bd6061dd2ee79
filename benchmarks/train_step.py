"""Training-step throughput, peak memory and MFU for a recipe at a model preset (synthetic batches).

    python benchmarks/train_step.py --preset bench-tiny --recipe coca [--bf16] [--batch 64]
    python benchmarks/train_step.py --preset bench-tiny --recipe coca --recipe sycoca   # side by side
    python benchmarks/train_step.py --preset bench-tiny --recipe coca --sweep model.image_size=64,96,128

MFU = FLOPs of one step (counted with ``torch.utils.flop_counter.FlopCounterMode``; PyTorch's CPU flash
attention, which it does not count, with the formulas it uses for its CUDA kernel) / step time / the
matmul peak measured in the same process right after the timed steps (median of square matmuls in the
step's precision), so that each process's step and peak are measured within seconds of each other on a
noisy shared machine; the table gives the median over rounds of those per-process MFUs and their range.
``--sweep KEY=v1,v2,...`` times one recipe at each value (one table: how cost grows with image size,
sequence length or width).

Each configuration runs in its own subprocess (clean peak-RSS numbers), alternating A/B for --rounds.
If ``open_clip`` is importable, its CoCa built with the same shapes is timed in the same run and the
ratio printed (open_clip does not install beside the CPU torch used in CI; see docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _synthetic_batch(cfg, vocab, batch, gen):
    import torch
    from finealign.types import Batch
    T = cfg.model.context_length
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=gen)
    text = torch.randint(5, vocab, (batch, T), generator=gen)          # 0-4: the tokenizer's specials
    text[:, 0] = 1
    mask = torch.arange(T)[None] < lengths[:, None]
    text = text.masked_fill(~mask, 0)
    text[torch.arange(batch), lengths - 1] = 2
    S = cfg.model.image_size
    views2 = torch.randn(batch, 3, S, S, generator=gen) if cfg.data.views == 2 else None   # SemMIM
    return Batch(images=torch.randn(batch, 3, S, S, generator=gen), images2=views2, text=text, text_mask=mask,
                 image_ids=torch.arange(batch), item_ids=torch.arange(batch), captions=[""] * batch,
                 keys=[""] * batch)


def run_finealign(recipe, preset, batch, bf16, steps, warmup, overrides=(), device="cpu"):
    import torch
    from finealign.config import load_config
    from finealign.models.factory import build_model
    from finealign.objectives import StepContext, build_objectives
    from finealign.pipeline import Pipeline
    from finealign.train.optim import build_optimizer
    from finealign.train.parallel import compile_blocks
    cfg = load_config(recipe, [f"model.preset={preset}", f"data.batch_size={batch}", *overrides])
    if cfg.train.retain_host_memory:               # as the Trainer does
        from finealign.train.host_memory import retain_freed_memory
        retain_freed_memory()
    vocab = cfg.model.vocab_size or 8192
    model = build_model(cfg.model, vocab).to(device)
    if cfg.train.compile:
        compile_blocks(model)
    objectives = build_objectives(cfg.objectives).to(device)
    needs = {r for o in objectives.values() for r in o.requires}
    tokenizer = None
    if cfg.masking.mlm or cfg.masking.sync:        # word masking reads the specials' ids (<mask> = 4)
        from finealign.data.tokenizer import Tokenizer
        tokenizer = Tokenizer.train(["a red heart", "two blue squares"], 300)
    # encode -> maskers -> mixer -> heads, as the trainer builds it
    pipeline = Pipeline(model, cfg.masking, tokenizer, needs, mixer=cfg.mixer, total_steps=10 ** 6)
    opt = build_optimizer(list(model.named_parameters()), cfg.train)
    gen = torch.Generator().manual_seed(0)
    b = _synthetic_batch(cfg, vocab, batch, gen).to(device)
    ctx = StepContext()

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            feats = pipeline(b)
            _mark("forward")
            loss = sum(o.weight * o(feats, b, ctx)["loss"] for o in objectives.values())
            _mark("objectives")
        loss.backward()
        _mark("backward")
        opt.step()
        _mark("optimizer")
        if hasattr(model, "momentum_update"):      # EMA teachers, as the trainer does after each step
            model.momentum_update()
            _mark("EMA update")
        opt.zero_grad(set_to_none=True)
    return _time(step, steps, warmup, batch, device, bf16)


def _mark(phase: str) -> None:
    """End of a phase of ``run_finealign``'s step (a no-op; ``profile_step.py --phases`` replaces it)."""


def run_open_clip(preset, batch, bf16, steps, warmup, device="cpu"):
    import open_clip  # noqa: F401  (only where it is installed)
    import torch
    from finealign.config import load_config
    m = load_config("coca", [f"model.preset={preset}"]).model
    model = open_clip.CoCa(
        embed_dim=m.embed_dim,
        multimodal_cfg=dict(width=m.text_width, context_length=m.context_length, vocab_size=m.vocab_size or 8192,
                            layers=m.decoder_layers, heads=m.text_heads),
        text_cfg=dict(width=m.text_width, context_length=m.context_length, vocab_size=m.vocab_size or 8192,
                      layers=m.text_layers, heads=m.text_heads, embed_cls=True, output_tokens=True),
        # open_clip's CoCa pooler: 1 contrastive + N caption queries in one pooler, as finealign's
        vision_cfg=dict(image_size=m.image_size, patch_size=m.patch_size, width=m.vision_width,
                        layers=m.vision_layers, attentional_pool=True, attn_pooler_heads=m.text_heads,
                        attn_pooler_queries=m.caption_queries + 1, output_tokens=True),
    ).to(device)
    loss_fn = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, m.image_size, m.image_size, generator=gen).to(device)
    text = torch.randint(4, m.vocab_size or 8192, (batch, m.context_length), generator=gen).to(device)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images, text)
            loss = loss_fn(**out, output_dict=False)
            loss = sum(loss) if isinstance(loss, (tuple, list)) else loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _time(step, steps, warmup, batch, device, bf16)


def matmul_peak(bf16, device="cpu", n=None, reps=10):
    """Median TFLOP/s of an n×n @ n×n matmul in fp32 or bf16 (the denominator of MFU)."""
    import torch
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return {"tflops": 2 * n ** 3 / statistics.median(times) / 1e12, "n": n}


def _count_cpu_flash_attention() -> None:
    """FlopCounterMode has formulas for PyTorch's CUDA attention kernels but not for its CPU flash kernel
    (torch 2.13: a CPU SDPA call counts 0), which fp32 attention on CPU uses in finealign and open_clip alike.
    Register the formulas PyTorch uses for the CUDA flash kernel (backward counts the recomputed scores), so
    that every attention call is counted; finealign's own CPU half-precision attention is plain matmuls."""
    import torch
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None) is None \
            or aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def _time(step, steps, warmup, batch, device="cpu", bf16=False):
    """Median step time; FLOPs of one step (FlopCounterMode, CPU flash attention included); peak memory =
    peak RSS on CPU, peak allocated CUDA memory on GPU (read before the matmul peak is measured); the matmul
    peak in the step's precision, measured right after the timed steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    _count_cpu_flash_attention()
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    peak = matmul_peak(bf16, device)["tflops"]
    return {"step_s": med, "samples_per_s": batch / med, "peak_rss_mb": peak_mb, "gflop": flops / 1e9,
            "peak_tflops": peak, "mfu": flops / med / 1e12 / peak}


def _child(args):
    if args.impl == "open_clip":
        res = run_open_clip(args.preset, args.batch, args.bf16, args.steps, args.warmup, args.device)
    else:
        res = run_finealign(args.impl, args.preset, args.batch, args.bf16, args.steps, args.warmup, args.set or (),
                            args.device)
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", help="recipe(s) to time (default: coca)")
    ap.add_argument("--preset", default="bench-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating A/B rounds")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config override for the finealign recipes (repeatable), e.g. model.mim_decoder_width=128")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on CPU, allocated on GPU)")
    ap.add_argument("--sweep", metavar="KEY=V1,V2,...", help="time the (first) recipe at each value of one key")
    ap.add_argument("--no-open-clip", action="store_true", help="do not time open_clip even if importable")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return _child(args)
    # a configuration = (label, impl, extra overrides)
    recipes = args.recipe or ["coca"]
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        configs = [(f"{recipes[0]} {key.split('.')[-1]}={v}", recipes[0], [f"{key}={v}"]) for v in values.split(",")]
    else:
        configs = [(r, r, []) for r in recipes]
        import importlib.util
        if args.no_open_clip:
            pass
        elif importlib.util.find_spec("open_clip") is not None:
            configs.append(("open_clip", "open_clip", []))
        else:
            print("(open_clip not importable: timing finealign only)")
    results = {label: [] for label, _, _ in configs}
    common = ["--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--device", args.device] + (["--bf16"] if args.bf16 else [])
    for rnd in range(args.rounds):
        for label, impl, extra in configs:
            cmd = [sys.executable, __file__, "--impl", impl, *common]
            cmd += [f"--set={o}" for o in [*(args.set or []), *extra] if impl != "open_clip"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                print(f"{label} failed (left out of the table)", file=sys.stderr)
                continue
            results[label].append({**json.loads(out.stdout.strip().splitlines()[-1]), "round": rnd})
    prec = "bf16" if args.bf16 else "fp32"
    peaks = [r["peak_tflops"] for rs in results.values() for r in rs]
    peak = f"{statistics.median(peaks):.2f} ({min(peaks):.2f}-{max(peaks):.2f})" if peaks else "n/a"
    print(f"\ndevice={args.device} preset={args.preset} batch={args.batch} precision={prec} rounds={args.rounds} "
          f"steps/round={args.steps} matmul peak={peak} TFLOP/s" + (f" overrides={' '.join(args.set)}" if args.set else ""))
    print("MFU: median over rounds of (step FLOPs / step time / the matmul peak measured in that process); "
          "step time vs first: ratio of the median step times, then the range of the per-round ratios")
    width = max(16, max(len(label) for label in results) + 1)
    print(f"{'impl':<{width}} {'samples/s':>10} {'step ms':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'MFU range':>13} {'peak MB':>9} {'step time vs first':>19} {'per round':>13}")
    base = base_rounds = None
    for label, rs in results.items():
        if not rs:
            continue
        sps = statistics.median(r["samples_per_s"] for r in rs)
        step_ms = 1000 * args.batch / sps
        base = base or step_ms
        by_round = {r["round"]: 1.0 / r["samples_per_s"] for r in rs}
        base_rounds = base_rounds or by_round
        ratios = [t / base_rounds[k] for k, t in by_round.items() if k in base_rounds]
        per_round = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "n/a"
        gflop = rs[0]["gflop"]
        mfus = [r["mfu"] for r in rs]
        span = f"{min(mfus):.1%}-{max(mfus):.1%}"
        print(f"{label:<{width}} {sps:10.1f} {step_ms:9.1f} {gflop:11.1f} {gflop / step_ms:8.2f} "
              f"{statistics.median(mfus):6.1%} {span:>13} {max(r['peak_rss_mb'] for r in rs):9.0f} "
              f"{step_ms / base:18.2f}x {per_round:>13}")


if __name__ == "__main__":
    main()
