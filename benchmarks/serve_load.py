"""Load test: ``finealign serve`` and in-process evaluation under many requests, memory tracked.

1. Starts the real server (``python -m finealign serve``, a subprocess on a free port) on a tiny CoCa
   trained on ``shapes`` (or ``--ckpt``), gallery = the run's training images (or ``--gallery``).
2. Sends a warm-up, then ``--requests`` sequential requests (a search / caption / relevance mix, 2:1:1),
   then ``--rounds`` times: ``--concurrent`` requests at once, ``--requests`` sequential again; the
   server's RSS (``/proc/PID/status``) is read after each phase.
3. In this process: ``--eval-batches`` sequential ``finealign.eval.runner.evaluate`` calls (retrieval on a
   ``--eval-images``-image batch, what ``finealign eval`` runs per batch), then the same rounds of
   ``--concurrent`` at once (threads) and ``--eval-batches`` again; this process's RSS after each.

Prints one table (phase, requests, errors, wall time, p50/p95 latency, RSS, RSS change from the first
measured phase). Linux only (reads /proc). Needs the serve extra and httpx.

    python benchmarks/serve_load.py                       # trains its own tiny checkpoint (~10 s)
    python benchmarks/serve_load.py --ckpt runs/coca-... --gallery data/emoji/images --requests 200
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def train_tiny(run: Path) -> Path:
    from finealign.cli import main
    assert main(["train", "coca", "data.source=shapes", "data.num_samples=8", "data.batch_size=8", "train.steps=150",
                 "train.lr=1e-3", "train.warmup=10", "train.ckpt_every=0", "train.log_every=50", "data.augment=false",
                 "tokenizer.vocab_size=300", f"train.run_dir={run}", "--no-progress"]) == 0
    return run


def write_gallery(run: Path, out: Path) -> list[str]:
    import finealign
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    cfg = finealign.load(run).config
    out.mkdir(parents=True, exist_ok=True)
    caps = []
    for i, s in enumerate(build_source(cfg.data, cfg.data.train, SkipLog())):
        s.load_image().save(out / f"{i:02d}.png")
        caps.append(s.captions[0])
    return caps


def start_server(run: Path, gallery: Path, cache: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(cache / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "finealign", "serve", str(run), "--gallery", str(gallery),
                             "--port", str(port), "--cache", str(cache)], stdout=log, stderr=subprocess.STDOUT)
    import httpx
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            httpx.get(url + "/api/info", timeout=5).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{(cache / 'server.log').read_text()}")
            time.sleep(0.3)


def make_request(client, url: str, i: int, images: list[bytes], captions: list[str]):
    """The i-th request of the mix: search, caption, search, relevance."""
    kind = ("search", "caption", "search", "relevance")[i % 4]
    img = images[i % len(images)]
    if kind == "search":
        r = client.get(url + "/api/search", params={"q": captions[i % len(captions)], "k": 5})
    elif kind == "caption":
        r = client.post(url + "/api/caption", files={"file": ("x.png", img, "image/png")})
    else:
        r = client.post(url + "/api/relevance", files={"file": ("x.png", img, "image/png")},
                        data={"text": captions[i % len(captions)]})
    return r.status_code


class Phase:
    def __init__(self, name: str):
        self.name, self.lat, self.errors, self.lock = name, [], 0, threading.Lock()

    def timed(self, fn, *a):
        t = time.perf_counter()
        try:
            ok = fn(*a) in (200, None)
        except Exception:                  # counted, not raised: a load test reports failures
            ok = False
        with self.lock:
            self.lat.append(time.perf_counter() - t)
            self.errors += not ok

    def run(self, fn, n: int, workers: int = 1):
        t = time.perf_counter()
        if workers == 1:
            for i in range(n):
                self.timed(fn, i)
        else:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(lambda i: self.timed(fn, i), range(n)))
        self.wall = time.perf_counter() - t
        return self


def row(p: Phase, rss: float, base: float) -> str:
    q = sorted(p.lat)
    p95 = q[min(len(q) - 1, int(0.95 * len(q)))]
    return (f"| {p.name:<38} | {len(q):5d} | {p.errors:3d} | {p.wall:7.1f} | {1e3 * statistics.median(q):7.1f} "
            f"| {1e3 * p95:7.1f} | {rss:7.1f} | {rss - base:+6.1f} |")


HEADER = ("| phase                                  |     n | err |  wall s |  p50 ms |  p95 ms | RSS MiB |  ΔMiB  |\n"
          "|----------------------------------------|-------|-----|---------|---------|---------|---------|--------|")


def phases(sequential: int, concurrent: int, rounds: int):
    """(name, n, workers): sequential, then per round: concurrent, sequential again. A leak grows with
    every repetition; memory held by the concurrent peak (thread stacks, malloc arenas) stays flat."""
    out = [(f"{sequential} sequential", sequential, 1)]
    for r in range(rounds):
        out += [(f"{concurrent} concurrent (round {r + 1})", concurrent, concurrent),
                (f"{sequential} sequential (after round {r + 1})", sequential, 1)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint / run dir (default: train a tiny CoCa on shapes)")
    ap.add_argument("--gallery", default=None, help="gallery dir (default: the tiny run's training images)")
    ap.add_argument("--requests", type=int, default=1000, help="sequential requests per phase (default: 1000)")
    ap.add_argument("--concurrent", type=int, default=50, help="requests in flight at once (default: 50)")
    ap.add_argument("--rounds", type=int, default=2, help="concurrent rounds, each followed by a sequential "
                    "phase (default: 2)")
    ap.add_argument("--eval-batches", type=int, default=1000, help="sequential evaluate() calls per phase")
    ap.add_argument("--eval-images", type=int, default=16, help="images per evaluate() batch (default: 16)")
    args = ap.parse_args(argv)
    import logging
    import httpx
    import torch
    logging.getLogger("httpx").setLevel(logging.WARNING)      # no line per request
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    run = Path(args.ckpt) if args.ckpt else train_tiny(tmp / "run")
    gallery = Path(args.gallery) if args.gallery else tmp / "gallery"
    captions = write_gallery(run, tmp / "gallery") if not args.gallery else ["a red circle", "a blue square"]
    images = [p.read_bytes() for p in sorted(gallery.iterdir()) if p.suffix == ".png"][:8]
    if not images:
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
        images = [buf.getvalue()]
    lines = [f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
             f"checkpoint {run}", "", "**server** (`finealign serve`, RSS of the server process)", "", HEADER]
    proc, url = start_server(run, gallery, tmp)
    try:
        with httpx.Client(timeout=600) as client:
            def req(i):
                return make_request(client, url, i, images, captions)
            Phase("warm-up (40 sequential)").run(req, 40)
            base = rss_mib(proc.pid)
            lines.append(f"| {'after start + warm-up':<38} |       |     |         |         |         | {base:7.1f} |   +0.0 |")
            for name, n, w in phases(args.requests, args.concurrent, args.rounds):
                p = Phase(name).run(req, n, w)
                lines.append(row(p, rss_mib(proc.pid), base))
                print(lines[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    import finealign
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    from finealign.eval.runner import evaluate
    loaded = finealign.load(run)
    cfg = loaded.config
    samples = [s for _, s in zip(range(args.eval_images), build_source(cfg.data, cfg.data.test, SkipLog()))]
    lines += ["", f"**in-process evaluation** (`evaluate(..., tasks=['retrieval'])` on {len(samples)} images "
                  f"per batch, RSS of this process)", "", HEADER]

    def ev(i):
        evaluate(loaded.model, loaded.tokenizer, cfg, tasks=["retrieval"], samples=samples, progress=False)
    Phase("warm-up (20)").run(ev, 20)
    base = rss_mib()
    lines.append(f"| {'after load + warm-up':<38} |       |     |         |         |         | {base:7.1f} |   +0.0 |")
    for name, n, w in phases(args.eval_batches, args.concurrent, args.rounds):
        p = Phase(name).run(ev, n, w)
        lines.append(row(p, rss_mib(), base))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
