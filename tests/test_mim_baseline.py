"""The random-mask MIM baseline recipe (`mim`): MAE-style masks, an encoder pass that never sees the masked
pixels, a decoder that never reads the text, and a reconstruction loss that falls while training."""
import torch

from finealign.config import load_config
from finealign.masking import MaskIndices
from finealign.models.factory import build_model
from finealign.pipeline import Pipeline
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer
from finealign.types import Batch
from test_sycoca import _batch          # random images and token ids (row 0 padded)


def test_masks_are_random_halves_drawn_without_the_text():
    cfg = load_config("mim")
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    pipe = Pipeline(model, cfg.masking, needs={"mim_pred"})
    assert not pipe.needs_relevance                      # random masks: no patch-text relevance computed
    b = _batch(cfg, B=4)
    N = model.visual.num_patches
    seen = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = pipe(b)
        masked = out.extras["mim_masked"]
        assert masked.shape == (4, N // 2)
        assert all(len(set(r.tolist())) == N // 2 for r in masked)                 # distinct patches per image
        seen.append(masked.sort(1).values)
    assert not torch.equal(seen[0], seen[1])                                    # fresh noise per draw
    assert len({tuple(r.tolist()) for r in seen[0]}) == 4                       # each image its own mask


def test_decoder_reads_neither_the_text_nor_the_masked_pixels():
    cfg = load_config("mim")
    assert cfg.model.mim_text is False and cfg.model.mim_visible == "reencode"
    torch.manual_seed(0)
    model = build_model(cfg.model, 64).eval()
    assert not any("cross" in n for n, _ in model.image_decoder.named_parameters())
    b = _batch(cfg, B=4)
    N, p = model.visual.num_patches, cfg.model.patch_size
    mim = MaskIndices(keep=torch.arange(N // 2).expand(4, -1), masked=torch.arange(N // 2, N).expand(4, -1))

    def pred(batch):
        with torch.no_grad():
            return model.heads(model.encode(batch), batch, {"mim": mim}).extras["mim_pred"]

    base = pred(b)
    other_text = Batch(**{**b.__dict__, "text": torch.randint(4, 50, b.text.shape)})
    assert torch.equal(base, pred(other_text))
    img = b.images.clone()
    img[:, :, -p:, :] += 3.0                                            # last patch row: all masked
    assert torch.equal(base, pred(Batch(**{**b.__dict__, "images": img})))
    img = b.images.clone()
    img[:, :, :p, :p] += 3.0                                            # patch 0: visible
    assert not torch.allclose(base, pred(Batch(**{**b.__dict__, "images": img})))


def test_mim_recipe_trains_on_shapes_and_its_loss_falls(tmp_path):
    cfg = load_config("mim", ["data.source=shapes", "data.num_samples=512", "data.batch_size=32",
                              "train.steps=50", "train.lr=1e-3", "train.warmup=5", "train.log_every=1",
                              "train.ckpt_every=0", "train.threads=2", f"train.run_dir={tmp_path}"])
    Trainer(cfg, progress=False).train()
    rows = read_metrics(tmp_path)
    mim = [r["train/mim/loss"] for r in rows]
    assert "train/itc/loss" in rows[-1] and len(mim) == 50
    first, last = sum(mim[:10]) / 10, sum(mim[-10:]) / 10
    assert last < 0.8 * first, (first, last)
