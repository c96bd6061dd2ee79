"""Distributed evaluation (2 gloo processes on the CPU) gives exactly the single-process results.

* ``evaluate`` in 2 processes started with ``torch.multiprocessing``: a CoCa model (retrieval, captions,
  zero-shot classification, TGIR; top-p captions) on a split with one unreadable image, and an ALBEF
  model whose retrieval is re-ranked by its ITM head; results (recalls, generated captions, skip
  counts) equal, and so do the gathered text embeddings and a sharded pair-score table.
* ``torchrun --nproc_per_node 2 -m finealign eval RUN --task retrieval --task caption`` writes the
  same JSON as ``finealign eval`` in one process (full caption scoring, METEOR included when Java is
  there).
* :func:`shard_bounds`: contiguous, batch-aligned shares covering every item once.

Models are randomly initialised (seeded): identity of the numbers is what is tested, not quality.
Every process runs with one intra-op thread (torchrun's default for several processes), the
reference too, so that CPU kernels are the same.
"""
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finealign.config import load_config
from finealign.data.sources.shapes import make_scene
from finealign.data.tokenizer import Tokenizer
from finealign.eval.shard import shard_bounds
from finealign.models.factory import build_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
N_IMAGES = 13                  # with eval batches of 4: ranks get 8 and 5 images (uneven)
COCA = ["data.source=shapes", "data.num_samples=64", "data.eval_batch_size=4", "eval.decode=top_p",
        "eval.temperature=2", "eval.max_new_tokens=6", f"eval.max_images={N_IMAGES}"]
ALBEF = ["data.source=shapes", "data.num_samples=64", "data.eval_batch_size=3", "model.momentum=0",
         "objectives.itc.distill_alpha=0",
         "eval.k_test=5", f"eval.max_images={N_IMAGES}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and two seeded random models (CoCa, ALBEF) saved where spawned processes find them."""
    root = tmp_path_factory.mktemp("dist_eval")
    tok = Tokenizer.train([make_scene(0, "test", i).caption for i in range(60)], vocab_size=300)
    tok.save(root / "tokenizer.json")
    for name, overrides in (("coca", COCA), ("albef", ALBEF)):
        cfg = load_config(name, overrides=overrides)
        torch.manual_seed(0)
        torch.save(build_model(cfg.model, tok.vocab_size).state_dict(), root / f"{name}.pt")
    return root


def _unreadable():
    raise OSError("truncated file")


def _evaluate_all(root: Path) -> dict:
    """Every evaluation of the test, run identically by the reference and by each rank."""
    from dataclasses import replace

    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    from finealign.eval import runner
    from finealign.eval.rerank import score_topk
    from finealign.eval.shard import Sharding

    tok = Tokenizer.load(root / "tokenizer.json")
    out = {}
    score = runner.score_captions
    runner.score_captions = functools.partial(score, meteor=False)       # METEOR: see the torchrun test
    try:
        cfg = load_config("coca", overrides=COCA)
        model = build_model(cfg.model, tok.vocab_size)
        model.load_state_dict(torch.load(root / "coca.pt"))
        samples = list(build_source(cfg.data, "test", SkipLog()))[:N_IMAGES]
        samples.insert(5, replace(samples[0], key="broken.png", load_image=_unreadable))
        encode, encoded = model.encode_image, []
        model.encode_image = lambda images: (encoded.append(len(images)), encode(images))[1]
        out["coca"] = runner.evaluate(model, tok, cfg, split="test", samples=samples, progress=False,
                                      tasks=["retrieval", "caption", "classify", "tgir"])
        out["encoded"] = sum(encoded)           # this process's share (not compared)
        # the pieces, exactly: text embeddings gathered in order, a pair-score table split by batches
        shard = Sharding.current()
        texts = [s.captions[0] for s in samples[:N_IMAGES]]
        out["text_embed"] = runner.embed_texts(model, tok, texts, cfg.model.context_length, "cpu", 4,
                                               shard=shard).tolist()
        topk = torch.arange(2 * N_IMAGES).view(N_IMAGES, 2) % 7
        out["pair_scores"] = score_topk(topk, lambda q, c: q * 100.0 + c, batch_size=3, shard=shard).tolist()
        cfg = load_config("albef", overrides=ALBEF)
        model = build_model(cfg.model, tok.vocab_size)
        model.load_state_dict(torch.load(root / "albef.pt"))
        out["albef"] = runner.evaluate(model, tok, cfg, split="test", tasks=["retrieval"], progress=False)
    finally:
        runner.score_captions = score
    return json.loads(json.dumps(out))        # the form a results file holds (floats round-trip exactly)


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _evaluate_all(Path(root))
    finally:
        dist.destroy_process_group()
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(res))


def _single_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_shard_bounds_are_contiguous_batch_aligned_and_complete():
    for n in (0, 1, 5, 13, 40):
        for world in (1, 2, 3, 8):
            parts = [shard_bounds(n, 4, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert all(x % 4 == 0 or x == n for lo, hi in parts for x in (lo, hi))
            batches = [-(-(hi - lo) // 4) for lo, hi in parts]
            assert max(batches) - min(batches) <= 1       # whole batches, spread evenly
    assert [shard_bounds(13, 4, r, 2) for r in range(2)] == [(0, 8), (8, 13)]


def test_two_process_evaluate_equals_single_process(assets):
    ref = _single_thread(_evaluate_all, assets)
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), str(assets)), nprocs=2, join=True)
    encoded, single_encoded = [], ref.pop("encoded")
    for rank in range(2):
        got = json.loads((assets / f"rank{rank}.json").read_text())
        encoded.append(got.pop("encoded"))
        assert got == ref, f"rank {rank} differs from the single-process evaluation"
    # the images were shared out, not each evaluated twice: 12 readable images (embedded, and again
    # when captioned) + a TGIR gallery of 26
    assert sum(encoded) == single_encoded == 2 * 12 + 26 and min(encoded) > 0
    assert ref["pair_scores"] == [[q * 100.0 + (2 * q + j) % 7 for j in range(2)] for q in range(N_IMAGES)]
    coca, albef = ref["coca"], ref["albef"]
    # the runs did what they claim: uneven shares, a skipped image, captions, ITM re-ranking
    assert coca["num_images"] == N_IMAGES - 1 and coca["skipped"]["total"] == 1     # eval.max_images cut
    assert coca["skipped"]["examples"] == {next(iter(coca["skipped"]["counts"])): ["broken.png"]}
    assert len(coca["samples"]) == N_IMAGES - 1 and all(s["generated"] for s in coca["samples"])
    assert {"retrieval", "caption", "classify", "tgir"} <= set(coca)
    assert albef["retrieval"]["k_test"] == 5 and "itc_mean_recall" in albef["retrieval"]


def test_torchrun_cli_eval_equals_single_process(assets, tmp_path):
    from finealign.cli import main
    from finealign.train.checkpoint import save_checkpoint

    tok = Tokenizer.load(assets / "tokenizer.json")
    cfg = load_config("coca", overrides=COCA)
    model = build_model(cfg.model, tok.vocab_size)
    model.load_state_dict(torch.load(assets / "coca.pt"))
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, cfg.to_dict(), extra={"tokenizer_json": tok.to_str()})
    args = ["eval", str(run), "--task", "retrieval", "--task", "caption", "--no-progress", "eval.decode=beam",
            "eval.beam_size=2"]

    assert _single_thread(main, args + ["--out", str(tmp_path / "single.json")]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "-m", "finealign", *args, "--out", str(tmp_path / "dist.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results written to") == 1          # rank 0 alone reports
    single = json.loads((tmp_path / "single.json").read_text())
    dist = json.loads((tmp_path / "dist.json").read_text())
    assert dist == single
    assert single["num_images"] == N_IMAGES and single["caption"]["num"] == N_IMAGES
    assert 0 <= single["retrieval"]["mean_recall"] <= 100
