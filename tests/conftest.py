"""Settings shared by every test.

A ``Trainer`` applies ``train.threads`` and ``train.deterministic`` process-wide (``torch.set_num_threads``,
``torch.use_deterministic_algorithms``), as it should for a real run. Inside one pytest process that
leaked into every later test: after the first test that trained with ``train.threads=1``, the rest of the
suite ran on one thread (test_maccap's colour test: 193 s there, 117 s alone). Both are put back after
each test.

``shapes_clip``: one trained CLIP for the tests that need a trained one (trained once per session).
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
