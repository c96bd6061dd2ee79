"""Caption decoding speed with and without the KV cache (random weights, random images).

    python benchmarks/generation.py                                   # tiny + bench-tiny, greedy + beam 4, batch 1 + 64
    python benchmarks/generation.py --preset tiny --batch 1 --strategy greedy --repeats 3

Every row decodes exactly ``--new-tokens`` tokens per image: EOS is set to an id the LM head cannot
emit (= the vocabulary size), so no row stops early; presets whose ``context_length`` is too short for
BOS + the new tokens get ``model.context_length`` raised (positional table only, nothing else changes).
tokens/s = images x new tokens / wall time of one ``model.generate`` call (image encoding included;
beam search counts the tokens of the returned caption, not those of all K beams). Cached and uncached
calls alternate inside one process, ``--repeats`` times; the median is reported, and the two outputs
are checked to be identical. "image encoding" (the ViT + pooler pass both paths start with) is timed on
its own in the same rounds; "decoding speed-up" leaves it out of both times.

    python benchmarks/generation.py --preset bench-tiny --batch 1 --dtype bfloat16    # weights and images in bf16
    python benchmarks/generation.py --cached-only --src /tmp/old/src    # another source tree (A/B)
    python benchmarks/generation.py --profile --preset bench-tiny --batch 64 --strategy beam   # torch.profiler
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BOS, PAD = 1, 0


def build(preset: str, new_tokens: int, vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    from finealign.config import load_config
    from finealign.models.factory import build_model
    overrides = [f"model.preset={preset}"]
    cfg = load_config("coca", overrides)
    if cfg.model.context_length < new_tokens + 1:
        overrides.append(f"model.context_length={new_tokens + 1}")
        cfg = load_config("coca", overrides)
    torch.manual_seed(seed)
    V = cfg.model.vocab_size or vocab
    return build_model(cfg.model, V).to(dtype).eval(), cfg.model, V


def time_generate(model, images, strategy, beam, new_tokens, eos, use_cache):
    t0 = time.perf_counter()
    out = model.generate(images, BOS, eos, PAD, strategy=strategy, beam_size=beam,
                         max_new_tokens=new_tokens, use_cache=use_cache)
    return time.perf_counter() - t0, out


@torch.no_grad()
def time_encode(model, images):
    t0 = time.perf_counter()
    model.encode_image(images)
    return time.perf_counter() - t0


def bench(args) -> list[dict]:
    rows = []
    modes = (True,) if args.cached_only else (True, False)
    for preset in args.preset:
        model, mcfg, V = build(preset, args.new_tokens, args.vocab, dtype=args.dtype)
        eos = V                                                  # never emitted: every row runs to the end
        for strategy in args.strategy:
            for B in args.batch:
                g = torch.Generator().manual_seed(B)
                images = torch.randn(B, 3, mcfg.image_size, mcfg.image_size, generator=g).to(args.dtype)
                times = {True: [], False: [], "encode": []}
                outs = {}
                time_generate(model, images, strategy, args.beam, 2, eos, True)   # warm-up
                for r in range(args.repeats):
                    for use_cache in (modes if r % 2 == 0 else modes[::-1]):
                        dt, outs[use_cache] = time_generate(model, images, strategy, args.beam,
                                                            args.new_tokens, eos, use_cache)
                        times[use_cache].append(dt)
                    times["encode"].append(time_encode(model, images))
                if outs[True].shape != (B, 1 + args.new_tokens):
                    sys.exit(f"expected {args.new_tokens} new tokens, got shape {tuple(outs[True].shape)}")
                n = B * args.new_tokens
                tc, te = statistics.median(times[True]), statistics.median(times["encode"])
                row = dict(preset=preset, strategy=f"beam {args.beam}" if strategy == "beam" else strategy,
                           batch=B, cached_s=tc, encode_s=te, cached=n / tc, cached_decode=n / max(tc - te, 1e-9))
                if not args.cached_only:
                    tu = statistics.median(times[False])
                    row.update(uncached_s=tu, uncached=n / tu, speedup=tu / tc,
                               decode_speedup=(tu - te) / max(tc - te, 1e-9), same=torch.equal(outs[True], outs[False]))
                rows.append(row)
                print(f"# {preset} {row['strategy']} B={B}: cached {tc:.3f}s "
                      + ("" if args.cached_only else f"uncached {row['uncached_s']:.3f}s identical={row['same']} ")
                      + f"(image encoding {te:.3f}s)", file=sys.stderr, flush=True)
    return rows


def profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile
    model, mcfg, V = build(args.preset[0], args.new_tokens, args.vocab, dtype=args.dtype)
    images = torch.randn(args.batch[0], 3, mcfg.image_size, mcfg.image_size).to(args.dtype)
    time_generate(model, images, args.strategy[0], args.beam, 2, V, not args.uncached)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        time_generate(model, images, args.strategy[0], args.beam, args.new_tokens, V, not args.uncached)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="model preset (repeatable; default tiny, bench-tiny)")
    p.add_argument("--strategy", action="append", choices=["greedy", "beam"], help="default: both")
    p.add_argument("--batch", action="append", type=int, help="images per call (repeatable; default 1, 64)")
    p.add_argument("--beam", type=int, default=4, help="beam size")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary when the preset sets none")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration and cache mode")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's weights and the images (bfloat16: the whole decode in bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--profile", action="store_true", help="profile one call of the first configuration")
    p.add_argument("--uncached", action="store_true", help="with --profile: profile the uncached path")
    p.add_argument("--cached-only", action="store_true", help="time the cached path only (A/B of versions)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"),
                   help="finealign source tree to import (default: this checkout's src/)")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    sys.path.insert(0, args.src)
    args.preset = args.preset or ["tiny", "bench-tiny"]
    args.strategy = args.strategy or ["greedy", "beam"]
    args.batch = args.batch or [1, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return 0
    rows = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {str(args.dtype).removeprefix('torch.')}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, finealign from {args.src}")
    if args.cached_only:
        print("| preset | strategy | batch | cached tok/s | image encoding ms |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['preset']} | {r['strategy']} | {r['batch']} | {r['cached']:.1f} | {1e3 * r['encode_s']:.0f} |")
        return 0
    print("| preset | strategy | batch | cached tok/s | uncached tok/s | speed-up | image encoding ms "
          "| decoding speed-up | identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['strategy']} | {r['batch']} | {r['cached']:.1f} | {r['uncached']:.1f} "
              f"| {r['speedup']:.2f}× | {1e3 * r['encode_s']:.0f} | {r['decode_speedup']:.2f}× "
              f"| {'yes' if r['same'] else 'NO'} |")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
