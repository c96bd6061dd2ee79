"""Data-pipeline throughput (decode + transforms + collate + tokenisation) beside the training step.

    python benchmarks/data_pipeline.py                       # emoji files + webdataset shards, workers 0 1 2
    python benchmarks/data_pipeline.py --workers 0 --batches 20 --recipe clip --train-steps 2   # quick
    python benchmarks/data_pipeline.py --profile             # where a workers=0 batch spends its time

What is timed is exactly what the trainer consumes: ``finealign.data.loader.TrainLoader`` batches
(image decode, the training ``ImageTransform`` with augmentation, ``collate_items`` and the
``Collator``'s tokenisation in the main process) at the model preset's image size and context length,
for ``data.workers`` = each of ``--workers``, for

* ``emoji``: the emoji dataset as files (``data.source=emoji``, ``data.root=--root``; PNG per image);
* ``webdataset``: the same training split written once into tar shards (``write_split_shards``, what
  ``finealign data shard --maxcount 500`` does) in a temporary directory, read back as
  ``data.source=webdataset`` (one process: "slice" mode, shuffle buffer 1000).

images/s = rows handed out / wall time over ``--batches`` batches after ``--warmup`` batches (the
warm-up includes starting the workers; epoch ends and worker restarts inside the timed window are
counted: they are part of what a training run sees). "main CPU ms/batch" is the CPU time of the main
process per batch: with workers it is what the pipeline still takes from the training process
(tokenisation, unpickling).

The consumption rate is the samples/s of a training step of ``--recipe`` (default coca and clip) at
``--preset`` on synthetic batches, timed with ``benchmarks/train_step.py``'s ``run_finealign`` (model
encode -> maskers -> heads -> objectives, backward, AdamW step; fp32), in this same run. Every
configuration runs in its own subprocess, configurations alternated for ``--rounds`` rounds; the
median of the rounds is reported.

Before/after comparisons in one run: ``--src before=/tmp/old/src --src after=src`` times the pipeline of
each named copy of the package (a directory holding ``finealign/``), alternated within every round;
the training step always runs this checkout's code.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE.parent / "src" / "finealign").is_dir():        # time this checkout, not another installed copy
    sys.path.insert(0, str(HERE.parent / "src"))


def _config(source: str, root: str, shards: str | None, preset: str, batch: int, workers: int):
    from finealign.config import load_config
    over = [f"model.preset={preset}", f"data.batch_size={batch}", f"data.workers={workers}", f"data.root={root}"]
    if source == "webdataset":
        over += ["data.source=webdataset", f"data.train={shards}"]
    else:
        over += [f"data.source={source}"]
    return load_config("coca", over)


def _tokenizer(root: str, preset: str):
    """The BPE a training run would train on the training captions (data.source=emoji)."""
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    from finealign.data.tokenizer import Tokenizer
    cfg = _config("emoji", root, None, preset, 64, 0)
    samples = build_source(cfg.data, "train", SkipLog())
    return Tokenizer.train((c for s in samples for c in s.captions), vocab_size=cfg.tokenizer.vocab_size,
                           lowercase=cfg.tokenizer.lowercase)


def run_pipeline(source: str, workers: int, root: str, shards: str | None, preset: str, batch: int,
                 batches: int, warmup: int) -> dict:
    """Images/s of ``TrainLoader`` for one (source, workers)."""
    from finealign.data.loader import TrainLoader, build_source
    from finealign.data.skips import SkipLog
    cfg = _config(source, root, shards, preset, batch, workers)
    tok = _tokenizer(root, preset)
    skips = SkipLog()
    src = build_source(cfg.data, "train", skips)
    t0 = time.perf_counter()
    loader = TrainLoader(src, tok, cfg.data, cfg.model.image_size, cfg.model.context_length, skips=skips)
    try:
        first = next(loader)
        first_s = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            next(loader)
        rows, c0, t = 0, time.process_time(), time.perf_counter()
        for _ in range(batches):
            rows += len(next(loader))
        wall, cpu = time.perf_counter() - t, time.process_time() - c0
    finally:
        loader.close()
    return {"images_per_s": rows / wall, "ms_per_batch": 1000 * wall / batches,
            "main_cpu_ms_per_batch": 1000 * cpu / batches, "first_batch_s": first_s,
            "shape": list(first.images.shape), "skipped": skips.total,
            "finealign": str(Path(sys.modules["finealign"].__file__).parent)}


# (label, file suffix, function name): where the main process spends a workers=0 batch (cProfile
# cumulative times; nested rows are indented and included in the row above them)
_STAGES = [
    ("TrainLoader batch (total)", "train_loader.py", "__next__"),
    ("  stream: tar read, json, shuffle buffer", "webdataset_source.py", "iter_with_skips"),
    ("  load_item (decode + transform)", "common.py", "load_item"),
    ("    read + decode file (emoji)", "emoji.py", "_open_rgb"),
    ("    decode bytes (webdataset)", "common.py", "open_image_bytes"),
    ("    to_rgb (all calls, EXIF)", "transforms.py", "to_rgb"),
    ("    ImageTransform", "transforms.py", "__call__"),
    ("      crop box", "transforms.py", "random_resized_crop_box"),
    ("      resize (PIL bicubic)", "~", "<method 'resize' of 'ImagingCore' objects>"),
    ("      pil_to_tensor", "transforms.py", "pil_to_tensor"),
    ("      brightness", "transforms.py", "_brightness"),
    ("      contrast", "transforms.py", "_contrast"),
    ("      normalize", "transforms.py", "normalize"),
    ("  collate_items (stack)", "loader.py", "collate_items"),
    ("  tokenise (Collator.finish)", "loader.py", "finish"),
]


def profile_pipeline(source: str, root: str, shards: str | None, preset: str, batch: int, batches: int,
                     warmup: int) -> list[tuple[str, float]]:
    """cProfile of ``batches`` workers=0 batches: (stage, ms per batch) for the ``_STAGES`` found."""
    import cProfile
    import pstats
    from finealign.data.loader import TrainLoader, build_source
    from finealign.data.skips import SkipLog
    cfg = _config(source, root, shards, preset, batch, 0)
    loader = TrainLoader(build_source(cfg.data, "train", SkipLog()), _tokenizer(root, preset), cfg.data,
                         cfg.model.image_size, cfg.model.context_length)
    for _ in range(warmup):
        next(loader)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(loader)
    prof.disable()
    loader.close()
    stats = pstats.Stats(prof).stats                     # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = []
    for label, suffix, name in _STAGES:
        ct = sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(suffix))
        if ct:
            out.append((label, 1000 * ct / batches))
    return out


def run_train_step(recipe: str, preset: str, batch: int, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(HERE))
    from train_step import run_finealign
    res = run_finealign(recipe, preset, batch, False, steps, warmup)
    return {"samples_per_s": res["samples_per_s"], "step_ms": 1000 * res["step_s"]}


def _child(args) -> None:
    if args.src_path:
        sys.path.insert(0, str(Path(args.src_path).resolve()))
    kind, _, what = args.job.partition(":")
    if kind == "train":
        res = run_train_step(what, args.preset, args.batch, args.train_steps, args.train_warmup)
    else:
        source, w = what.rsplit("/", 1)
        res = run_pipeline(source, int(w), args.root, args.shards, args.preset, args.batch,
                           args.batches, args.warmup)
    print(json.dumps(res))


def _write_shards(root: str, preset: str, out_dir: Path, maxcount: int) -> str:
    from finealign.data.sources.webdataset_source import write_split_shards
    cfg = _config("emoji", root, None, preset, 64, 0)
    info = write_split_shards(cfg.data, "train", str(out_dir / "train-%06d.tar"), maxcount=maxcount)
    print(f"wrote {len(info['shards'])} shard(s), {info['samples']} samples, to {out_dir}")
    return str(out_dir)                        # a directory: every *.tar inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/emoji", help="emoji dataset directory")
    ap.add_argument("--source", action="append", choices=["emoji", "webdataset"],
                    help="sources to time (default: both)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data.workers values")
    ap.add_argument("--preset", default="tiny", help="model preset (image size, context length)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=94, help="timed batches per configuration and round")
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches first (includes worker start)")
    ap.add_argument("--recipe", action="append", help="training recipe(s) whose step is timed (default: coca, clip)")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (median reported)")
    ap.add_argument("--maxcount", type=int, default=500, help="samples per webdataset shard")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: cProfile workers=0 batches of each source, time per stage")
    ap.add_argument("--src", action="append", metavar="NAME=PATH",
                    help="time the pipeline of the finealign package under PATH (repeatable, A/B in one run)")
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--src-path", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        return _child(args)
    if not (Path(args.root) / "train.jsonl").is_file():
        sys.exit(f"no emoji dataset at {args.root}: run `finealign data build emoji --out {args.root}`")
    sources, recipes = args.source or ["emoji", "webdataset"], args.recipe or ["coca", "clip"]
    tmp = Path(tempfile.mkdtemp(prefix="finealign-shards-"))
    try:
        shards = _write_shards(args.root, args.preset, tmp, args.maxcount) if "webdataset" in sources else None
        if args.profile:
            for s in sources:
                rows = profile_pipeline(s, args.root, shards, args.preset, args.batch, args.batches, args.warmup)
                print(f"\n{s}, workers=0, cProfile over {args.batches} batches of {args.batch} "
                      f"(profiler overhead included; nested rows are part of the row above)")
                for label, ms in rows:
                    print(f"  {label:<42} {ms:8.2f} ms/batch")
            return
        codes = dict(_code(c) for c in args.src) if args.src else {"": ""}
        jobs = [(f"train:{r}", "") for r in recipes]
        jobs += [(f"pipe:{s}/{w}", c) for s in sources for w in args.workers for c in codes]
        results: dict[tuple[str, str], list[dict]] = {j: [] for j in jobs}
        for rnd in range(args.rounds):
            for job, code in jobs:
                cmd = [sys.executable, __file__, "--job", job, "--root", args.root, "--preset", args.preset,
                       "--batch", str(args.batch), "--batches", str(args.batches), "--warmup", str(args.warmup),
                       "--train-steps", str(args.train_steps), "--train-warmup", str(args.train_warmup)]
                cmd += ["--shards", shards] if shards else []
                cmd += ["--src-path", codes[code]] if codes.get(code) else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    print(f"{job} {code} failed (left out of the table)", file=sys.stderr)
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[(job, code)].append(res)
                print(f"round {rnd + 1} {job} {code}: {json.dumps(res)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _table(args, sources, recipes, list(codes), results)


def _code(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not (Path(path) / "finealign").is_dir():
        sys.exit(f"--src {spec!r}: expected NAME=PATH with PATH/finealign a package directory")
    return name, path


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _table(args, sources, recipes, codes, results) -> None:
    import torch
    train = {r: _med(results[(f"train:{r}", "")], "samples_per_s") for r in recipes
             if results[(f"train:{r}", "")]}
    print(f"\npreset={args.preset} batch={args.batch} rounds={args.rounds} batches/round={args.batches} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print("training step (synthetic batches, fp32, run_finealign):")
    for r, sps in train.items():
        print(f"  {r:<6} {sps:8.1f} samples/s  ({1000 * args.batch / sps:.0f} ms/step)")
    named = codes != [""]
    hdr = (f"{'code':<10} " if named else "") + \
        f"{'source':<11} {'workers':>7} {'images/s':>9} {'ms/batch':>9} {'main CPU ms/batch':>18}"
    hdr += "".join(f" {'x ' + r + ' step':>12}" for r in train)
    hdr += f" {'vs ' + codes[0]:>10}" if len(codes) > 1 else ""
    print(hdr)
    for s in sources:
        for w in args.workers:
            first = None
            for c in codes:
                rs = results[(f"pipe:{s}/{w}", c)]
                if not rs:
                    continue
                ips = _med(rs, "images_per_s")
                first = first or ips
                line = (f"{c:<10} " if named else "") + (
                    f"{s:<11} {w:>7} {ips:9.0f} {_med(rs, 'ms_per_batch'):9.1f} "
                    f"{_med(rs, 'main_cpu_ms_per_batch'):18.1f}")
                line += "".join(f" {ips / sps:11.1f}x" for sps in train.values())
                line += f" {ips / first:9.2f}x" if len(codes) > 1 else ""
                print(line)


if __name__ == "__main__":
    main()
