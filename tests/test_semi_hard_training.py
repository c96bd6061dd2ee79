"""data.sampler=semi_hard in training: periodic re-embedding, the item and near-duplicate rules in
every batch, exact resume (sampler state in the checkpoint); grouped still trains."""
import logging

import pytest
import torch

from finealign.config import load_config
from finealign.data.loader import TrainLoader, build_source
from finealign.data.skips import SkipLog
from finealign.data.tokenizer import Tokenizer
from finealign.train import checkpoint as ckpt
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer
from finealign.train.refresh import embed_pairs, refresh_sampler

UPPER = 0.95


def cfg(run_dir, *extra, sampler="semi_hard"):
    # text embeddings of the tiny untrained model spread enough for batches of 8 under UPPER;
    # a small lr keeps them so for a few steps (at the default lr they collapse above it)
    return load_config("clip", ["data.source=shapes-items", "data.num_samples=96", "data.batch_size=8",
                                f"data.sampler={sampler}", "data.refresh_every=2", "data.refresh_embed=text",
                                f"data.semi_hard_upper={UPPER}", "train.lr=1e-5", "train.warmup=1",
                                "train.steps=6", "train.ckpt_every=0", "train.log_every=1",
                                "train.threads=1", f"train.run_dir={run_dir}", *extra])


def record(trainer):
    """Wrap ``trainer.train_step``: per step the batch's dataset indices, item ids and the
    sampler embeddings in force (the refresh comes before the batch is drawn)."""
    ds = trainer.loader.dataset
    index = {s.key: i for i, s in enumerate(ds.samples)}
    assert len(ds) == len(ds.samples)                 # shapes-items: one caption per image
    steps, step = [], trainer.train_step

    def spy(batch, *rows):
        sh = trainer.loader.semi_hard
        steps.append({"step": trainer.step + 1, "idx": [index[k] for k in batch.keys],
                      "items": batch.item_ids.tolist(), "emb": sh.embeddings if sh else None})
        return step(batch, *rows)
    trainer.train_step = spy
    return steps


def test_refreshed_batches_keep_item_and_upper_rules(tmp_path):
    t = Trainer(cfg(tmp_path), progress=False)
    steps = record(t)
    t.train()
    assert t.step == 6 and t.refreshes == 3                        # before steps 1, 3 and 5
    refreshed = [r["step"] for r in read_metrics(tmp_path) if "sampler/refresh_s" in r]
    assert refreshed == [0, 2, 4]
    sh = t.loader.semi_hard
    assert sh.dropped == 0 and sh.embeddings is not None and sh.embeddings.shape[0] == 96
    assert all(s["emb"] is not None for s in steps)
    assert steps[1]["emb"] is steps[0]["emb"] and steps[2]["emb"] is not steps[1]["emb"]
    for s in steps:
        assert len(s["items"]) == 8 and len(set(s["items"])) == 8, s   # never two views of one item
        e = s["emb"][s["idx"]]
        sim = (e @ e.T).fill_diagonal_(-1)
        assert sim.max() <= UPPER + 1e-5, (s["step"], float(sim.max()))
    # the rule is not vacuous: random batches under these embeddings break it
    emb = steps[-1]["emb"]
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0)).view(12, 8)
    broken = sum(float((emb[b] @ emb[b].T).fill_diagonal_(-1).max()) > UPPER for b in perm)
    assert broken >= 6
    # a refresh embeds every pair's caption with the current model, in dataset order, centred
    t.model.train()
    res = refresh_sampler(t.model, t.loader, "text", tokenizer=t.tokenizer,
                          context_length=t.cfg.model.context_length, image_size=32, device="cpu")
    assert t.model.training and res["has_embeddings"] == 1 and res["refresh_s"] > 0
    t.model.eval()
    caps = [t.loader.dataset.pair(i)[1] for i in range(96)]
    ids, mask = t.tokenizer.encode_batch(caps, t.cfg.model.context_length)
    with torch.no_grad():
        want = t.model.encode_text(ids, mask)["embed"]
    want = torch.nn.functional.normalize(want - want.mean(0), dim=-1)
    torch.testing.assert_close(sh.embeddings, want, rtol=1e-5, atol=1e-5)


def test_refresh_every_zero_embeds_once_before_step_one(tmp_path):
    t = Trainer(cfg(tmp_path, "data.refresh_every=0", "train.steps=3"), progress=False)
    steps = record(t)
    t.train()
    assert t.refreshes == 1
    assert [r["step"] for r in read_metrics(tmp_path) if "sampler/refresh_s" in r] == [0]
    assert steps[0]["emb"] is not None and all(s["emb"] is steps[0]["emb"] for s in steps)


def test_untrained_image_embeddings_fall_back_to_random_batches(tmp_path, caplog):
    """The tiny untrained ViT maps images to two tight clusters: no batch of 8 fits under UPPER."""
    t = Trainer(cfg(tmp_path, "data.refresh_embed=image", "train.steps=2"), progress=False)
    steps = record(t)
    with caplog.at_level(logging.WARNING, logger="finealign"):
        t.train()
    assert t.step == 2 and t.refreshes == 1
    assert t.loader.semi_hard.dropped == 1 and t.loader.semi_hard.embeddings is None
    assert "cannot form one batch" in caplog.text
    assert all(len(set(s["items"])) == 8 for s in steps)          # the item rule still holds


def test_embed_pairs_images_use_the_eval_transform(tmp_path):
    t = Trainer(cfg(tmp_path), progress=False)
    t.model.eval()
    ds = t.loader.dataset
    emb = embed_pairs(t.model, ds, "image", image_size=32, batch_size=40)   # (N, E), 3 batches
    assert emb.shape == (96, t.cfg.model.embed_dim)
    from finealign.data.transforms import ImageTransform
    tf = ImageTransform(32, train=False)
    x = torch.stack([tf(ds.samples[i].load_image().convert("RGB"), None) for i in (0, 50, 95)])
    with torch.no_grad():
        want = t.model.encode_image(x)["embed"]
    torch.testing.assert_close(emb[[0, 50, 95]], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("refresh_every", [2, 3])
def test_resume_reproduces_batches_and_weights(tmp_path, refresh_every):
    """Checkpoint at step 2, resume: steps 3-4 see the same batches. With refresh_every=3 the resumed
    run draws step 3 from the embeddings saved in the checkpoint (refreshed at step 0)."""
    common = ["train.steps=4", "train.ckpt_every=2", f"data.refresh_every={refresh_every}",
              "data.augment=true"]
    full = Trainer(cfg(tmp_path / "full", *common), progress=False)
    ref = record(full)
    full.train()
    Trainer(cfg(tmp_path / "part", *common), progress=False).train(until=2)
    state = ckpt.load_checkpoint(tmp_path / "part" / "checkpoints" / "step_00000002")["loader_state"]
    assert state["epoch"] == 0 and state["position"] == 2
    assert state["sampler"]["used"].sum() == 16 and state["sampler"]["embeddings"].shape[0] == 96
    resumed = Trainer(cfg(tmp_path / "part", *common), resume="latest", progress=False)
    assert resumed.step == 2
    got = record(resumed)
    resumed.train()
    assert resumed.refreshes == 1                                   # at step 2 / at step 3
    assert [g["step"] for g in got] == [3, 4]
    assert all(r["emb"] is not None for r in ref)
    for g, r in zip(got, ref[2:]):
        assert g["idx"] == r["idx"]
        assert torch.equal(g["emb"], r["emb"])
    for (n, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(p, q), n


def test_grouped_sampler_still_trains(tmp_path):
    t = Trainer(cfg(tmp_path, "train.steps=3", sampler="grouped"), progress=False)
    steps = record(t)
    t.train()
    assert t.step == 3 and t.refreshes == 0 and t.loader.semi_hard is None
    assert all(len(set(s["items"])) == len(s["items"]) == 8 for s in steps)
    assert "sampler" not in t.loader.state_dict()
    with pytest.raises(TypeError, match="semi_hard"):
        t.loader.update_embeddings(torch.zeros(96, 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_update_embeddings_checks_and_restarts_at_consumed_batch(workers):
    """With workers the DataLoader prefetches past the consumed batch: the update and the state
    still refer to the consumed position."""
    c = load_config("clip", ["data.source=shapes-items", "data.num_samples=96", "data.batch_size=8",
                             "data.sampler=semi_hard", "data.augment=false"])
    src = build_source(c.data, "train", SkipLog())
    tok = Tokenizer.train([x for s in src for x in s.captions], 300)
    c.data.workers = workers
    loader = TrainLoader(src, tok, c.data, 32, 32)
    with pytest.raises(ValueError, match=r"\(96, E\)"):
        loader.update_embeddings(torch.zeros(95, 4))
    it = iter(loader)
    first = [next(it).keys for _ in range(3)]
    emb = torch.nn.functional.one_hot(torch.arange(96) % 12, 12).float()   # 12 orthogonal groups
    loader.update_embeddings(emb)
    state = loader.state_dict()
    assert state["position"] == 3 and int(state["sampler"]["used"].sum()) == 24
    after = [next(it).keys for _ in range(3)]
    seen = {k for ks in first for k in ks}
    assert not seen & {k for ks in after for k in ks}            # no pair twice in the epoch
    index = {s.key: i for i, s in enumerate(loader.dataset.samples)}
    for ks in after:                                             # sim 1 within a group > upper
        groups = [index[k] % 12 for k in ks]
        assert len(set(groups)) == 8
    live = loader.state_dict()                                   # the iterator has run ahead
    cont = [next(it).keys for _ in range(3)]
    loader.close()
    c.data.workers = 0
    for st, want in ((state, after + cont), (live, cont)):
        other = TrainLoader(src, tok, c.data, 32, 32)
        other.load_state_dict(st)
        assert [next(other).keys for _ in range(len(want))] == want
