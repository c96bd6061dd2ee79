"""Exact, fast pins of finealign serve (app.py, gallery.py) and interop (hf_clip.py, hf_text.py, export.py).

Everything runs on a tiny untrained CLIP built in-process (no training): the API's search and closest-caption
scores are checked against embeddings computed here by hand, the relevance overlay against the blend formula,
the gallery's cache key / checkpoint identity / caption-candidate rules against the module docstring, the
CLIPModel config and state-dict conversion against the table in hf_clip's docstring (synthetic tensors, no
transformers needed), the HF text tower's config resolution and length limit, and the export's file rules.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from finealign.api import Loaded
from finealign.config import ConfigError, load_config
from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import ImageTransform, to_rgb
from finealign.interop import hf_clip as H
from finealign.interop.export import ExportError, export, is_export_dir, load_export
from finealign.interop.hf_text import resolve_text_tower
from finealign.models.factory import build_model
from finealign.serve import gallery as G

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
from fastapi import HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from finealign.serve.app import create_app, overlay_png, read_upload  # noqa: E402

SMALL = ["model.vision_width=32", "model.vision_layers=1", "model.text_width=32", "model.text_layers=1",
         "model.embed_dim=16", "model.text_pool=eos"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    tok = Tokenizer.train(["a red circle", "a blue square", "two green triangles"] * 3, vocab_size=300)
    cfg = load_config("clip", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok).eval()
    d = tmp_path_factory.mktemp("ckpt")
    (d / "meta.json").write_text('{"x": 1}')
    return Loaded(model=model, tokenizer=tok, config=cfg, path=d)


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _img(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- app.py
def test_search_scores_ranks_and_k_are_exact(tiny, tmp_path):
    from finealign.eval.runner import embed_texts
    with torch.no_grad():
        e = embed_texts(tiny.model, tiny.tokenizer, ["a red circle"], 32, "cpu")[0]
    embeds = torch.stack([-e, 2 * e, 0.5 * e])                       # scores -|e|^2, 2|e|^2, 0.5|e|^2
    n2 = float(e @ e)
    g = G.Gallery(tmp_path, ["a.png", "b.png", "c.png"], embeds, [], torch.zeros(0, 16), "none")
    client = TestClient(create_app(tiny, g))
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
    assert info["captioner"] is None and info["image_size"] == 32 and info["arch"] == tiny.config.model.arch
    assert info["max_upload_bytes"] == 8 * 1024 * 1024 and info["gallery"]["images"] == 3


def test_caption_closest_scores_use_the_uploaded_image_embedding(tiny, tmp_path):
    img = _img(1)
    x = ImageTransform(32, train=False)(to_rgb(img))[None]
    with torch.no_grad():
        e = tiny.model.encode_image(x)["embed"].float()[0]
    caps = ["x", "y", "z"]
    g = G.Gallery(tmp_path, ["a.png"], torch.zeros(1, 16), caps, torch.stack([0.25 * e, -e, e]), "src!")
    client = TestClient(create_app(tiny, g))
    out = client.post("/api/caption", files={"file": ("u.png", _png(img), "image/png")}, data={"k": "2"}).json()
    n2 = float(e @ e)
    assert out["captions"] == [] and out["closest_source"] == "src!" and out["captioner"] is None
    assert [c["caption"] for c in out["closest"]] == ["z", "x"]
    assert [c["score"] for c in out["closest"]] == pytest.approx([round(n2, 4), round(0.25 * n2, 4)], abs=2e-4)
    out = client.post("/api/caption", files={"file": ("u.png", _png(img), "image/png")}).json()
    assert [c["caption"] for c in out["closest"]] == ["z", "x", "y"]                 # k=5 > 3 captions
    empty = G.Gallery(tmp_path, ["a.png"], torch.zeros(1, 16), [], torch.zeros(0, 16), "none (why)")
    out = TestClient(create_app(tiny, empty)).post(
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
    assert [p.relative_to(tmp_path).as_posix() for p in G.list_images(tmp_path)] == ["B.gif", "a-c.png", "a/b.png", "c.PNG"]
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


def test_caption_candidates_order_dedup_limit_and_errors(tiny, tmp_path, monkeypatch):
    root = tmp_path / "g"
    root.mkdir()
    _img(0, 8).save(root / "a.png")
    _img(1, 8).save(root / "b.png")
    (root / "captions.csv").write_text("filepath,title\na.png,from csv\n")
    caps, where = G.caption_candidates(root, tiny.config)
    assert (caps, where) == (["from csv"], "gallery: captions.csv")
    lines = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"},
             {"image": "b.png", "caption": "one"}, {"image": "a.png", "caption": "three"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    caps, where = G.caption_candidates(root, tiny.config)               # jsonl wins over csv
    assert where == "gallery: captions.jsonl" and sorted(caps) == ["one", "three", "two"]
    monkeypatch.setattr(G, "MAX_CANDIDATES", 1)              # a.png's own two captions stop the scan: cut to 1
    assert G.caption_candidates(root, tiny.config)[0] == ["one"]
    (root / "captions.jsonl").unlink()
    (root / "captions.csv").write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match="captions.csv: cannot read gallery captions"):   # the user's own file
        G.caption_candidates(root, tiny.config)
    (root / "captions.csv").unlink()
    cfg = load_config("clip", SMALL + ["data.source=jsonl", f"data.root={tmp_path / 'nowhere'}"])
    caps, where = G.caption_candidates(root, cfg)
    assert caps == [] and where.startswith("none (no captions.jsonl / captions.csv in the gallery")
    cfg = load_config("clip", SMALL + ["data.source=shapes", "data.num_samples=8"])
    caps, where = G.caption_candidates(root, cfg)                    # procedural training data: always there
    assert where == f"training dataset: shapes {cfg.data.test}" and len(caps) == 1


def test_load_gallery_embeds_skips_and_reuses_only_a_matching_cache(tiny, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    for i in range(3):
        _img(10 + i, 20).save(root / f"{i}.png")
    (root / "9_bad.png").write_bytes(b"not an image")
    (root / "captions.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a red circle"}) + "\n")
    names, embeds, skipped = G.embed_gallery(tiny, root, batch_size=2)
    assert names == ["0.png", "1.png", "2.png"] and [s[0] for s in skipped] == ["9_bad.png"]
    x = torch.stack([G.read_image(root / n, 32) for n in names])
    with torch.no_grad():
        torch.testing.assert_close(embeds, tiny.model.encode_image(x)["embed"].float(), atol=1e-5, rtol=0)
    g = G.load_gallery(tiny, root, tmp_path / "cache")
    assert not g.from_cache and g.names == names and g.captions == ["a red circle"]
    assert g.caption_embeds.shape == (1, 16) and g.info()["skipped"] == [list(skipped[0])]
    again = G.load_gallery(tiny, root, tmp_path / "cache")
    assert again.from_cache and torch.equal(again.embeds, g.embeds) and again.skipped == g.skipped
    state = torch.load(g.cache_file, weights_only=True)
    torch.save({**state, "key": "someone else's"}, g.cache_file)        # same file name, another key
    assert not G.load_gallery(tiny, root, tmp_path / "cache").from_cache


def test_gallery_of_only_unreadable_images_is_a_clear_error(tiny, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of its 1 images could be read"):
        G.load_gallery(tiny, tmp_path, tmp_path / "cache")


# ---------------------------------------------------------------- hf_clip.py
def _hf_cfg(**over):
    v = dict(image_size=16, patch_size=4, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=5)
    t = dict(vocab_size=60, max_position_embeddings=12, hidden_size=32, intermediate_size=48,
             num_hidden_layers=3, num_attention_heads=4)
    return {"model_type": "clip", "vision_config": {**v, **over.pop("v", {})},
            "text_config": {**t, **over.pop("t", {})}, **over}


def test_clip_model_config_table():
    m = H.clip_model_config(_hf_cfg(projection_dim=24))
    assert m == {"arch": "coca", "image_pool": "cls", "decoder_layers": 0, "image_size": 16, "patch_size": 4,
                 "vision_width": 40, "vision_layers": 2, "vision_heads": 5, "mlp_ratio": 1.8,
                 "text_width": 32, "text_layers": 3, "text_heads": 4, "text_mlp_ratio": 1.5,
                 "vocab_size": 60, "context_length": 12, "embed_dim": 24, "act": "quick_gelu",
                 "vision_ln_pre": True, "text_pool": "eos"}
    assert H.clip_model_config(_hf_cfg())["embed_dim"] == 512
    for act, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")):
        assert H.clip_model_config(_hf_cfg(v={"hidden_act": act}, t={"hidden_act": act}))["act"] == ours
    bad = [_hf_cfg(v={"hidden_act": "gelu"}),                             # the towers disagree
           _hf_cfg(v={"hidden_act": "relu"}, t={"hidden_act": "relu"}),
           _hf_cfg(t={"hidden_size": 11, "intermediate_size": 15}),    # int(11 * (15/11)) == 14
           {**_hf_cfg(), "model_type": "bert"}, _hf_cfg(v={"layer_norm_eps": 1e-6})]
    for hf in bad:
        with pytest.raises(H.HFConversionError):
            H.clip_model_config(hf)
    del (missing := _hf_cfg())["vision_config"]["patch_size"]
    with pytest.raises(H.HFConversionError, match="lacks"):
        H.clip_model_config(missing)


def _hf_sd(D=6, p=2, N=4, C=5, V=7, E=3, Dt=4, L=1):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"vision_model.embeddings.class_embedding": r(D),
          "vision_model.embeddings.patch_embedding.weight": r(D, 3, p, p),
          "vision_model.embeddings.position_embedding.weight": r(1 + N, D),
          "vision_model.embeddings.position_ids": torch.arange(1 + N)[None],
          "text_model.embeddings.token_embedding.weight": r(V, Dt),
          "text_model.embeddings.position_embedding.weight": r(C, Dt),
          "visual_projection.weight": r(E, D), "text_projection.weight": r(E, Dt), "logit_scale": r(())}
    for tower, w in (("vision_model", D), ("text_model", Dt)):
        for n in (("pre_layrnorm", "post_layernorm") if tower == "vision_model" else ("final_layer_norm",)):
            sd[f"{tower}.{n}.weight"], sd[f"{tower}.{n}.bias"] = r(w), r(w)
        for i in range(L):
            a = f"{tower}.encoder.layers.{i}"
            for lin, shape in (("self_attn.q_proj", (w, w)), ("self_attn.k_proj", (w, w)),
                               ("self_attn.v_proj", (w, w)), ("self_attn.out_proj", (w, w)),
                               ("mlp.fc1", (2 * w, w)), ("mlp.fc2", (w, 2 * w))):
                sd[f"{a}.{lin}.weight"], sd[f"{a}.{lin}.bias"] = r(*shape), r(shape[0])
            for n in ("layer_norm1", "layer_norm2"):
                sd[f"{a}.{n}.weight"], sd[f"{a}.{n}.bias"] = r(w), r(w)
    return sd


def test_convert_clip_state_dict_mapping():
    sd = _hf_sd()
    out = H.convert_clip_state_dict(dict(sd), 1, 1)
    V, T = "vision_model", "text_model"
    assert torch.equal(out["visual.cls_token"], sd[f"{V}.embeddings.class_embedding"].reshape(1, 1, 6))
    conv = sd[f"{V}.embeddings.patch_embedding.weight"]
    assert torch.equal(out["visual.patch_embed.weight"][2], conv[2].flatten())          # (C, p, p) order
    assert torch.equal(out["visual.patch_embed.bias"], torch.zeros(6))
    assert torch.equal(out["visual.pos_embed"][0], sd[f"{V}.embeddings.position_embedding.weight"])
    assert torch.equal(out["text.pos_embed"][0], sd[f"{T}.embeddings.position_embedding.weight"])
    for tower, ours in ((V, "visual"), (T, "text")):
        a, b = f"{tower}.encoder.layers.0", f"{ours}.blocks.0"
        for kind in ("weight", "bias"):
            want = torch.cat([sd[f"{a}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
            assert torch.equal(out[f"{b}.attn.qkv.{kind}"], want)
            assert torch.equal(out[f"{b}.attn.proj.{kind}"], sd[f"{a}.self_attn.out_proj.{kind}"])
            assert torch.equal(out[f"{b}.mlp.fc.{kind}"], sd[f"{a}.mlp.fc1.{kind}"])
            assert torch.equal(out[f"{b}.mlp.proj.{kind}"], sd[f"{a}.mlp.fc2.{kind}"])
            assert torch.equal(out[f"{b}.ln_1.{kind}"], sd[f"{a}.layer_norm1.{kind}"])
            assert torch.equal(out[f"{b}.ln_2.{kind}"], sd[f"{a}.layer_norm2.{kind}"])
    assert torch.equal(out["visual.ln_pre.weight"], sd[f"{V}.pre_layrnorm.weight"])
    assert torch.equal(out["visual.ln_post.bias"], sd[f"{V}.post_layernorm.bias"])
    assert torch.equal(out["text.ln_final.weight"], sd[f"{T}.final_layer_norm.weight"])
    assert torch.equal(out["image_proj.weight"], sd["visual_projection.weight"])
    assert torch.equal(out["text_proj.weight"], sd["text_projection.weight"])
    assert out["logit_scale"].shape == () and out["logit_scale"] == sd["logit_scale"]
    with pytest.raises(H.HFConversionError, match="not used by the conversion: \\['extra.w'\\]"):
        H.convert_clip_state_dict({**sd, "extra.w": torch.zeros(1)}, 1, 1)
    with pytest.raises(H.HFConversionError, match="lack 'logit_scale'"):
        H.convert_clip_state_dict({k: v for k, v in sd.items() if k != "logit_scale"}, 1, 1)


def test_read_hf_weights_sharded_and_bin(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    sd = H.read_hf_weights(tmp_path)
    assert sorted(sd) == ["a", "b"] and torch.equal(sd["b"], torch.zeros(3))
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"c": torch.arange(3)}, d / "pytorch_model.bin")
    assert torch.equal(H.read_hf_weights(d)["c"], torch.arange(3))
    with pytest.raises(H.HFConversionError, match="not valid JSON"):
        (d / "config.json").write_text("{")
        H.read_hf_config(d)


# ---------------------------------------------------------------- hf_text.py
def test_resolve_text_tower_rules(tmp_path):
    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 24,
                                               "max_position_embeddings": 32}))
    (d / "tokenizer.json").write_text("{}")
    cfg = load_config("clip", SMALL)
    cfg.model.text_path = str(d)
    cfg.tokenizer.path = ""
    resolve_text_tower(cfg)                                   # context_length 32 == max_position_embeddings
    assert cfg.model.text_width == 24 and cfg.tokenizer.path == str(d)
    assert cfg.model.text_hf_config["hidden_size"] == 24
    cfg.model.text_path, cfg.tokenizer.path = str(tmp_path / "gone"), "mine"
    cfg.model.text_hf_config = {"model_type": "bert", "hidden_size": 8}       # a stored config wins
    resolve_text_tower(cfg)
    assert cfg.model.text_width == 8 and cfg.tokenizer.path == "mine"
    for hc in ({"model_type": "bert", "hidden_size": 8, "max_position_embeddings": 31},
               {"model_type": "clip", "hidden_size": 8}, {"model_type": "bert"}):
        cfg.model.text_hf_config = hc
        with pytest.raises(ConfigError):
            resolve_text_tower(cfg)
    cfg.model.text_hf_config, cfg.tokenizer.path = {"model_type": "bert", "hidden_size": 8}, ""
    with pytest.raises(ConfigError, match="tokenizer"):
        resolve_text_tower(cfg)


def test_hf_text_tower_length_limit_mask_default_and_no_pooler():
    pytest.importorskip("transformers")
    from finealign.interop.hf_text import HFTextTower
    cfg = load_config("clip", SMALL).model
    cfg.text_hf_config = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30,
                          "max_position_embeddings": 8}
    cfg.context_length, cfg.text_pool = 6, "mean"
    torch.manual_seed(0)
    tower = HFTextTower(cfg, pretrained=False).eval()
    assert tower.hf.pooler is None and tower.width == 8
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, tokens = tower(ids)
        pooled2, _ = tower(ids, torch.ones(2, 6, dtype=torch.bool))
        assert tokens.shape == (2, 6, 8)
        torch.testing.assert_close(pooled, tokens.mean(1))
        torch.testing.assert_close(pooled, pooled2)
        with pytest.raises(ValueError, match="exceeds context_length 6"):
            tower(torch.ones(1, 7, dtype=torch.long))


# ---------------------------------------------------------------- export.py
def test_is_export_dir_rules(tmp_path):
    assert not is_export_dir(tmp_path / "none")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_export_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("")
    assert is_export_dir(tmp_path)                            # hand-made
    for ck in ("meta.json", "state.pt"):
        (tmp_path / ck).write_text("")
        assert not is_export_dir(tmp_path), ck                # a checkpoint, not an export
        (tmp_path / ck).unlink()
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "export.json").write_text("{}")
    assert is_export_dir(tmp_path)


def test_export_files_modes_marker_and_reload(tiny, tmp_path):
    from finealign.train.checkpoint import _sha256
    out = export(tiny, tmp_path / "ex")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors",
                                                     "tokenizer.json"]      # no temporary files left
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    marker = json.loads((out / "export.json").read_text())
    assert marker["format"] == "finealign-export" and marker["version"] == 1
    assert marker["files"] == {n: _sha256(out / n) for n in ("model.safetensors", "config.yaml", "tokenizer.json")}
    b = load_export(out)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(b.model.encode_image(x)["embed"], tiny.model.encode_image(x)["embed"])
    with pytest.raises(ExportError, match="already holds an export"):
        export(tiny, out)
    (out / "export.json").unlink()
    (out / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no model.vocab_size"):
        load_export(out)
