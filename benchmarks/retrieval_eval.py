"""Retrieval evaluation time: 5,000 images x 25,000 captions, both directions, Recall@1/5/10.

    python benchmarks/retrieval_eval.py                                  # E = 512 and 256, 2 threads
    git show REV:src/finealign/eval/retrieval.py > /tmp/retrieval_before.py
    python benchmarks/retrieval_eval.py --compare-with /tmp/retrieval_before.py   # before / after, alternating

Random L2-normalised fp32 embeddings, 5 captions per image (captions in image order, as COCO's 5k test
split), scored by ``finealign.eval.retrieval.retrieval_metrics`` (the chunked i2t + t2i path, input
checks included). Each configuration is timed ``--repeats`` times after one warm-up call, alternating
with the ``--compare-with`` implementation when given (its ranks must be identical); the median is
reported. "matmul floor" is one plain ``image @ text.T`` over the whole matrix, chunk by chunk: the
least any exact method that scores every pair once has to spend.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(f"retrieval_compare_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def data(n_img: int, per_image: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n_img * per_image, dim, generator=g), dim=-1)
    return img, txt, torch.arange(n_img * per_image) // per_image


def matmul_floor(img, txt, chunk):
    t0 = time.perf_counter()
    for s in range(0, img.shape[0], chunk):
        img[s:s + chunk] @ txt.T
    return time.perf_counter() - t0


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--per-image", type=int, default=5, help="captions per image")
    p.add_argument("--dim", action="append", type=int, help="embedding size (repeatable; default 512, 256)")
    p.add_argument("--chunk", type=int, default=1024, help="retrieval_metrics(chunk=...)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-with", metavar="FILE", action="append", default=[],
                   help="another retrieval.py to time side by side (repeatable)")
    p.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"),
                   help="finealign source tree to import (default: this checkout's src/)")
    args = p.parse_args(argv)
    sys.path.insert(0, args.src)
    torch.set_num_threads(args.threads)
    from finealign.eval import retrieval as current
    impls = [("finealign", current)]
    impls = [(path, load_module(path)) for path in args.compare_with] + impls
    rows, ok = [], True
    for dim in args.dim or [512, 256]:
        img, txt, t2i = data(args.images, args.per_image, dim)
        times = {name: [] for name, _ in impls}
        floor, results = [], {}
        for name, mod in impls:                                      # warm-up (and the results to compare)
            results[name] = mod.retrieval_ranks(img, txt, t2i, chunk=args.chunk)
        for r in range(args.repeats):
            order = impls if r % 2 == 0 else impls[::-1]
            for name, mod in order:
                dt, _ = timed(mod.retrieval_metrics, img, txt, t2i, chunk=args.chunk)
                times[name].append(dt)
            floor.append(matmul_floor(img, txt, args.chunk))
        ref = results[impls[0][0]]
        for name, _ in impls:
            same = all(torch.equal(a, b) for a, b in zip(ref, results[name]))
            ok &= same
            rows.append((dim, name, statistics.median(times[name]), same))
        rows.append((dim, "matmul floor (1 product)", statistics.median(floor), None))
        metrics = current.recall_metrics(*results["finealign"])
        print(f"# E={dim}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), file=sys.stderr)
    I, T = args.images, args.images * args.per_image
    print(f"{I} images x {T} captions, fp32, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"chunk {args.chunk}, median of {args.repeats}")
    print("| E | implementation | seconds | identical ranks |")
    print("|---:|---|---:|---|")
    for dim, name, sec, same in rows:
        print(f"| {dim} | {name} | {sec:.3f} | {'' if same is None else ('yes' if same else 'NO')} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
