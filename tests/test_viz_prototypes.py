"""viz prototypes: selection of the most used prototypes and their most confident patches, patch
crops, the figure on a stand-in model (the real SemMIM model is tested end to end elsewhere), and
the error for a model without a prototype head."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finealign.analysis.viz_prototypes import (NO_PROTO_HEAD, patch_crop, prototype_counts,
                                               save_prototype_figure, select_prototype_patches)

G, P = 4, 4              # grid, patch -> 16 x 16 images, N = 16
S = G * P


def _logits() -> torch.Tensor:
    """(B=2, N=3, K=4) hand-built: argmax counts k2: 3, k0: 2, k3: 1, k1: 0."""
    x = torch.full((2, 3, 4), -5.0)
    x[0, 0, 2], x[0, 1, 2], x[1, 2, 2] = 3.0, 5.0, 1.0     # k2 assigned 3 patches
    x[0, 2, 0], x[1, 0, 0] = 4.0, 2.0                      # k0 assigned 2
    x[1, 1, 3] = 6.0                                       # k3 assigned 1
    x[1, 1, 2] = 5.5                                       # high k2 prob on a k3 patch (still 2nd)
    return x


def test_counts_and_selection_order():
    x = _logits()
    assert prototype_counts(x).tolist() == [2, 0, 3, 1]
    sel = select_prototype_patches(x, num=2, top=2)
    assert [k for k, _ in sel] == [2, 0]
    probs = torch.softmax(x, -1)
    (k2, p2), (k0, p0) = sel
    assert [(b, n) for b, n, _ in p2] == [(0, 1), (0, 0)]   # 5.0 vs 5.5-with-6.0-rival vs 3.0
    assert [(b, n) for b, n, _ in p0] == [(0, 2), (1, 0)]
    for b, n, pr in p2:
        assert pr == pytest.approx(float(probs[b, n, 2]))
    # sorted descending by probability
    assert p2[0][2] >= p2[1][2] and p0[0][2] >= p0[1][2]


def test_selection_skips_unused_and_caps_top():
    sel = select_prototype_patches(_logits(), num=10, top=100)
    assert [k for k, _ in sel] == [2, 0, 3]                   # k1 is nobody's argmax
    assert all(len(p) == 6 for _, p in sel)                   # all B*N patches, no more
    with pytest.raises(ValueError):
        select_prototype_patches(_logits(), num=0, top=1)


def test_selection_ties_lower_index_first():
    x = torch.zeros(1, 4, 3)
    x[0, 0, 1] = x[0, 1, 1] = x[0, 2, 0] = x[0, 3, 0] = 1.0   # k0 and k1 both used twice
    sel = select_prototype_patches(x, num=1, top=2)
    assert sel[0][0] == 0 and [(b, n) for b, n, _ in sel[0][1]] == [(0, 2), (0, 3)]


def test_patch_crop_centres_the_patch_with_context():
    img = torch.arange(G * G, dtype=torch.float).repeat_interleave(P).reshape(G, S)
    img = img.repeat_interleave(P, 0)[None].repeat(3, 1, 1) / 100    # pixel value = patch index / 100
    crop = patch_crop(img, 5, G, P, context=1)                         # row 1, col 1: all inside
    assert crop.shape == (3, 3 * P, 3 * P)
    assert torch.all(crop[:, P:2 * P, P:2 * P] == 0.05)
    assert crop[0, 0, 0] == 0.0 and crop[0, -1, -1] == 0.10            # patches 0 and 10
    corner = patch_crop(img, 0, G, P, context=1, fill=1.0)            # top-left: padded
    assert torch.all(corner[:, :P, :] == 1.0) and torch.all(corner[:, P:2 * P, P:2 * P] == 0.0)


class StandIn(nn.Module):
    """Minimal model with the SemMIM contract: proto_head, visual.grid, patch_prototypes."""

    def __init__(self, k: int = 5):
        super().__init__()
        self.visual = SimpleNamespace(grid=G)
        self.proto_head = nn.Linear(3, k)
        torch.manual_seed(0)
        nn.init.normal_(self.proto_head.weight, std=3.0)

    @torch.no_grad()
    def patch_prototypes(self, images):
        B = images.shape[0]
        x = images.reshape(B, 3, G, P, G, P).mean((3, 5))              # (B, 3, G, G)
        return self.proto_head(x.flatten(2).transpose(1, 2))            # (B, N, K)


def _loaded(model):
    cfg = SimpleNamespace(model=SimpleNamespace(arch="fusion", image_size=S, patch_size=P, prototypes=5))
    return SimpleNamespace(model=model, config=cfg, tokenizer=None)


def _write_images(d, n=3):
    rs = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rs.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    (d / "notes.txt").write_text("not an image")


def test_figure_with_stand_in_model(tmp_path):
    _write_images(tmp_path)
    out = save_prototype_figure(_loaded(StandIn()), tmp_path, tmp_path / "fig" / "p.png", num=3, top=4)
    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_no_proto_head_is_a_clear_error(tmp_path):
    _write_images(tmp_path)
    plain = nn.Module()
    plain.visual = SimpleNamespace(grid=G)
    with pytest.raises(ValueError, match=r"no prototype head \(model.prototypes = 0\); train a semmim recipe"):
        save_prototype_figure(_loaded(plain), tmp_path, tmp_path / "p.png")
    off = StandIn()
    off.proto_head = None                                              # prototypes = 0 builds none
    with pytest.raises(ValueError, match="semmim"):
        save_prototype_figure(_loaded(off), tmp_path, tmp_path / "p.png")
    assert "semmim" in NO_PROTO_HEAD


def test_cli_registered_and_dispatches(tmp_path, monkeypatch, capsys):
    import finealign.api
    from finealign.cli import build_parser, main
    args = build_parser().parse_args(["viz", "prototypes", "ck", "--images", "d"])
    assert (args.viz_verb, args.out, args.num, args.top) == ("prototypes", "prototypes.png", 8, 6)
    _write_images(tmp_path)
    monkeypatch.setattr(finealign.api, "load", lambda path, *a, **k: _loaded(StandIn()))
    out = tmp_path / "cli.png"
    assert main(["viz", "prototypes", "ck", "--images", str(tmp_path), "--out", str(out),
                 "--num", "2", "--top", "3"]) == 0
    assert out.is_file()
    monkeypatch.setattr(finealign.api, "load", lambda path, *a, **k: _loaded(nn.Linear(2, 2)))
    assert main(["viz", "prototypes", "ck", "--images", str(tmp_path)]) == 2
    assert "train a semmim recipe" in capsys.readouterr().err
