"""Exact, fast pins of finealign serve (app.py, gallery.py).

Everything runs on a tiny untrained CLIP (the ``tiny_clip`` fixture, no training): the API's search and
closest-caption scores are checked against embeddings computed here by hand, the relevance overlay against the
blend formula, and the gallery's cache key / checkpoint identity / caption-candidate rules against the module
docstring.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image

from finealign.config import load_config
from finealign.data.transforms import ImageTransform, to_rgb
from finealign.serve import gallery as G

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
from fastapi import HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from finealign.serve.app import create_app, overlay_png, read_upload  # noqa: E402


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _img(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))

# ---------------------------------------------------------------- app.py
def test_search_scores_ranks_and_k_are_exact(tiny_clip, tmp_path):
    from finealign.eval.runner import embed_texts
    with torch.no_grad():
        e = embed_texts(tiny_clip.model, tiny_clip.tokenizer, ["a red circle"], 32, "cpu")[0]
    embeds = torch.stack([-e, 2 * e, 0.5 * e])                       # scores -|e|^2, 2|e|^2, 0.5|e|^2
    n2 = float(e @ e)
    g = G.Gallery(tmp_path, ["a.png", "b.png", "c.png"], embeds, [], torch.zeros(0, 16), "none")
    client = TestClient(create_app(tiny_clip, g))
    res = client.get("/api/search", params={"q": "  a red circle ", "k": 2}).json()
    assert res["query"] == "a red circle"
    assert [(r["rank"], r["index"], r["name"], r["url"]) for r in res["results"]] == [
        (1, 1, "b.png", "/api/gallery/1"), (2, 2, "c.png", "/api/gallery/2")]
    assert [r["score"] for r in res["results"]] == [round(2 * n2, 4), round(0.5 * n2, 4)]
    assert len(client.get("/api/search", params={"q": "x"}).json()["results"]) == 3     # default 8 > N
    (tmp_path / "a.png").write_bytes(b"first")
    r = client.get("/api/gallery/0")
    assert r.status_code == 200 and r.content == b"first"
    info = client.get("/api/info").json()
    assert info["captioner"] is None and info["image_size"] == 32 and info["arch"] == tiny_clip.config.model.arch
    assert info["max_upload_bytes"] == 8 * 1024 * 1024 and info["gallery"]["images"] == 3


def test_caption_closest_scores_use_the_uploaded_image_embedding(tiny_clip, tmp_path):
    img = _img(1)
    x = ImageTransform(32, train=False)(to_rgb(img))[None]
    with torch.no_grad():
        e = tiny_clip.model.encode_image(x)["embed"].float()[0]
    caps = ["x", "y", "z"]
    g = G.Gallery(tmp_path, ["a.png"], torch.zeros(1, 16), caps, torch.stack([0.25 * e, -e, e]), "src!")
    client = TestClient(create_app(tiny_clip, g))
    out = client.post("/api/caption", files={"file": ("u.png", _png(img), "image/png")}, data={"k": "2"}).json()
    n2 = float(e @ e)
    assert out["captions"] == [] and out["closest_source"] == "src!" and out["captioner"] is None
    assert [c["caption"] for c in out["closest"]] == ["z", "x"]
    assert [c["score"] for c in out["closest"]] == pytest.approx([round(n2, 4), round(0.25 * n2, 4)], abs=2e-4)
    out = client.post("/api/caption", files={"file": ("u.png", _png(img), "image/png")}).json()
    assert [c["caption"] for c in out["closest"]] == ["z", "x", "y"]                 # k=5 > 3 captions
    empty = G.Gallery(tmp_path, ["a.png"], torch.zeros(1, 16), [], torch.zeros(0, 16), "none (why)")
    out = TestClient(create_app(tiny_clip, empty)).post(
        "/api/caption", files={"file": ("u.png", _png(img), "image/png")}).json()
    assert out["closest"] == [] and out["closest_source"] == "none (why)"


def test_read_upload_formats_modes_and_limits(monkeypatch):
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        data = _png(_img(2, 8), fmt)
        im = read_upload(data, "x", len(data))                     # exactly the limit is accepted
        assert im.mode == "RGB" and im.size == (8, 8), fmt
    la = _png(Image.new("LA", (4, 4), (200, 255)))
    assert read_upload(la, "x", 10**6).mode == "RGB"
    with pytest.raises(HTTPException) as e:
        read_upload(la, "x", len(la) - 1)
    assert e.value.status_code == 413
    with pytest.raises(HTTPException) as e:
        read_upload(b"", None, 10)
    assert e.value.status_code == 400 and e.value.detail.startswith("upload: ")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)                   # 8x8 = 64 > 2 * 10: a "bomb"
    with pytest.raises(HTTPException) as e:
        read_upload(_png(_img(3, 8)), "bomb.png", 10**6)
    assert e.value.status_code == 413 and "too many pixels" in e.value.detail


def test_overlay_png_is_the_blend_of_image_and_normalised_heat():
    import matplotlib
    from finealign.data.transforms import denormalize
    image = torch.zeros(3, 4, 4)
    rel = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = np.asarray(Image.open(io.BytesIO(overlay_png(image, rel, side=4))).convert("RGB")).astype(float)
    base = (denormalize(image).clamp(0, 1)[:, 0, 0].numpy() * 255).astype(np.uint8).astype(float)
    cmap = matplotlib.colormaps["inferno"]
    for (i, j), v in np.ndenumerate(np.array([[0.0, 1 / 3], [2 / 3, 1.0]])):
        heat = (np.array(cmap(v)[:3]) * 255).astype(np.uint8).astype(float)
        want = base * 0.45 + heat * 0.55
        for di in range(2):                        # nearest upsampling: each cell a 2x2 block
            for dj in range(2):
                assert np.abs(out[2 * i + di, 2 * j + dj] - want).max() <= 1.0, (i, j)


# ---------------------------------------------------------------- gallery.py
def test_list_images_sorts_by_relative_posix_path(tmp_path):
    for rel in ("a/b.png", "a-c.png", "B.gif", "c.PNG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in G.list_images(tmp_path)]
    assert got == ["B.gif", "a-c.png", "a/b.png", "c.PNG"]
    with pytest.raises(FileNotFoundError):
        G.list_images(tmp_path / "B.gif")


def test_checkpoint_identity_and_cache_key(tmp_path, monkeypatch):
    from finealign.train.checkpoint import _sha256
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "meta.json").write_text("META")
    (ck / "w.bin").write_bytes(b"1")
    assert G.checkpoint_identity(ck) == hashlib.sha256(b"META").hexdigest()
    (ck / "w.bin").write_bytes(b"2")                                  # meta.json alone names it
    assert G.checkpoint_identity(ck) == hashlib.sha256(b"META").hexdigest()
    (ck / "meta.json").unlink()
    want = hashlib.sha256(b"w.bin\0" + _sha256(ck / "w.bin").encode()).hexdigest()
    assert G.checkpoint_identity(ck) == want
    (ck / "w.bin").write_bytes(b"3")
    assert G.checkpoint_identity(ck) != want

    root = tmp_path / "g"
    root.mkdir()
    (root / "a.png").write_bytes(b"aa")
    files = G.list_images(root)
    k = G.cache_key("id", root, files, 32)
    assert k == G.cache_key("id", root, files, 32)
    assert k != G.cache_key("id2", root, files, 32) and k != G.cache_key("id", root, files, 64)
    st = (root / "a.png").stat()
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    k2 = G.cache_key("id", root, files, 32)
    assert k2 != k
    (root / "a.png").write_bytes(b"ab")                                 # same size, mtime restored
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert G.cache_key("id", root, files, 32) == k2
    (root / "a.png").write_bytes(b"abc")
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    k3 = G.cache_key("id", root, files, 32)
    assert k3 != k2
    (root / "captions.csv").write_text("filepath,title\na.png,a thing\n")
    assert G.cache_key("id", root, files, 32) != k3                  # the caption file counts
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert G.default_cache_dir() == tmp_path / "xdg" / "finealign" / "serve"


def test_caption_candidates_order_dedup_limit_and_errors(tiny_clip, tmp_path, monkeypatch):
    root = tmp_path / "g"
    root.mkdir()
    _img(0, 8).save(root / "a.png")
    _img(1, 8).save(root / "b.png")
    (root / "captions.csv").write_text("filepath,title\na.png,from csv\n")
    caps, where = G.caption_candidates(root, tiny_clip.config)
    assert (caps, where) == (["from csv"], "gallery: captions.csv")
    lines = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"},
             {"image": "b.png", "caption": "one"}, {"image": "a.png", "caption": "three"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    caps, where = G.caption_candidates(root, tiny_clip.config)               # jsonl wins over csv
    assert where == "gallery: captions.jsonl" and sorted(caps) == ["one", "three", "two"]
    monkeypatch.setattr(G, "MAX_CANDIDATES", 1)              # a.png's own two captions stop the scan: cut to 1
    assert G.caption_candidates(root, tiny_clip.config)[0] == ["one"]
    (root / "captions.jsonl").unlink()
    (root / "captions.csv").write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match="captions.csv: cannot read gallery captions"):   # the user's own file
        G.caption_candidates(root, tiny_clip.config)
    (root / "captions.csv").unlink()
    cfg = load_config("clip", TINY_CLIP + ["data.source=jsonl", f"data.root={tmp_path / 'nowhere'}"])
    caps, where = G.caption_candidates(root, cfg)
    assert caps == [] and where.startswith("none (no captions.jsonl / captions.csv in the gallery")
    cfg = load_config("clip", TINY_CLIP + ["data.source=shapes", "data.num_samples=8"])
    caps, where = G.caption_candidates(root, cfg)                    # procedural training data: always there
    assert where == f"training dataset: shapes {cfg.data.test}" and len(caps) == 1


def test_load_gallery_embeds_skips_and_reuses_only_a_matching_cache(tiny_clip, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    for i in range(3):
        _img(10 + i, 20).save(root / f"{i}.png")
    (root / "9_bad.png").write_bytes(b"not an image")
    (root / "captions.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a red circle"}) + "\n")
    names, embeds, skipped = G.embed_gallery(tiny_clip, root, batch_size=2)
    assert names == ["0.png", "1.png", "2.png"] and [s[0] for s in skipped] == ["9_bad.png"]
    x = torch.stack([G.read_image(root / n, 32) for n in names])
    with torch.no_grad():
        torch.testing.assert_close(embeds, tiny_clip.model.encode_image(x)["embed"].float(), atol=1e-5, rtol=0)
    g = G.load_gallery(tiny_clip, root, tmp_path / "cache")
    assert not g.from_cache and g.names == names and g.captions == ["a red circle"]
    assert g.caption_embeds.shape == (1, 16) and g.info()["skipped"] == [list(skipped[0])]
    again = G.load_gallery(tiny_clip, root, tmp_path / "cache")
    assert again.from_cache and torch.equal(again.embeds, g.embeds) and again.skipped == g.skipped
    state = torch.load(g.cache_file, weights_only=True)
    torch.save({**state, "key": "someone else's"}, g.cache_file)        # same file name, another key
    assert not G.load_gallery(tiny_clip, root, tmp_path / "cache").from_cache


def test_gallery_of_only_unreadable_images_is_a_clear_error(tiny_clip, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of its 1 images could be read"):
        G.load_gallery(tiny_clip, tmp_path, tmp_path / "cache")
