"""Settings shared by every test.

A ``Trainer`` applies ``train.threads`` and ``train.deterministic`` process-wide (``torch.set_num_threads``,
``torch.use_deterministic_algorithms``), as it should for a real run. Inside one pytest process that
leaked into every later test: after the first test that trained with ``train.threads=1``, the rest of the
suite ran on one thread (test_maccap's colour test: 193 s there, 117 s alone). Both are put back after
each test.

``shapes_clip``: one trained CLIP for the tests that need a trained one (trained once per session).
``tiny_clip``: an untrained tiny CLIP as ``finealign.load`` returns it (serve, interop and report pins).
``one_thread``: tests of tiny tensors on one thread. ``semi_hard_star``: the hand-built embeddings of the semi-hard sampler tests.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_process_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def one_thread():
    """Tiny matmuls: intra-op threads only add latency (badly so on a loaded machine). The fixture above
    puts the count back."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_clip(tmp_path_factory):
    """CLIP (tiny) trained 300 seeded steps on 2,000 shapes scenes, once per session (~70 s): test_train checks
    that it retrieves far above chance, test_maccap uses its run directory as a frozen backbone. Returns
    the ``Trainer`` (model, tokenizer, config; ``run_dir`` holds the final checkpoint)."""
    from finealign.config import load_config
    from finealign.train.loop import Trainer
    run = tmp_path_factory.mktemp("shapes-clip")
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=2000", "data.batch_size=64",
                               "train.steps=300", "train.lr=5e-4", "train.warmup=30", "train.log_every=50",
                               "train.ckpt_every=0", "train.threads=2", f"train.run_dir={run}",
                               "eval.max_images=200"])
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    return trainer


#: the ``tiny_clip`` model's overrides of the clip recipe (``from conftest import TINY_CLIP`` for configs like it)
TINY_CLIP = ["model.vision_width=32", "model.vision_layers=1", "model.text_width=32", "model.text_layers=1",
             "model.embed_dim=16", "model.text_pool=eos"]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """An untrained CLIP (1 layer, width 32, embed 16, seed 0) with a tokenizer trained on three shape captions,
    wrapped as ``finealign.load`` returns it (``path``: a directory holding a meta.json). Tests must not
    change it; building it leaves the global RNG as it was."""
    from finealign.api import Loaded
    from finealign.config import load_config
    from finealign.data.tokenizer import Tokenizer
    from finealign.models.factory import build_model
    tok = Tokenizer.train(["a red circle", "a blue square", "two green triangles"] * 3, vocab_size=300)
    cfg = load_config("clip", TINY_CLIP)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok).eval()
    d = tmp_path_factory.mktemp("tiny-clip")
    (d / "meta.json").write_text('{"x": 1}')
    return Loaded(model=model, tokenizer=tok, config=cfg, path=d)


def _semi_hard_star(seed: int = 0, n: int = 10):
    """Embeddings around epoch 0's first seed s of ``SemiHardBatchSampler(seed=seed)``: sample j has similarity
    c_j to s and c_i * c_j to sample i (an own orthogonal direction each); the 0.88 one shares the seed's
    item. Returns (x (n, n+1), items, s, {c: index})."""
    s = int(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[0])
    others = [j for j in range(n) if j != s]
    c = dict(zip(others, [0.45, 0.97, 0.6, 0.85, 0.35, 0.93, 0.75, 0.88, 0.2]))   # similarity to the seed
    at = {v: j for j, v in c.items()}
    items = list(range(n))
    items[at[0.88]] = items[s]
    x = torch.zeros(n, n + 1)
    x[s, 0] = 1.0
    for j in others:
        x[j, 0], x[j, j + 1] = c[j], (1 - c[j] ** 2) ** 0.5
    return x, items, s, at


@pytest.fixture
def semi_hard_star():
    """The builder ``(seed=0, n=10) -> (x, items, s, at)`` of ``_semi_hard_star``."""
    return _semi_hard_star
