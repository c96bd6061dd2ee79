"""finealign serve's JSON API through FastAPI's TestClient, on a tiny CoCa that memorised 8 shapes scenes:
search finds the right image, captions come back, bad uploads get a 4xx with a message, the gallery
embedding cache is reused and invalidated."""
import io
import json
import os
import shutil

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="finealign serve needs the serve extra (fastapi): pip install -e '.[test]'")
pytest.importorskip("multipart", reason="finealign serve needs python-multipart: pip install -e '.[test]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx: pip install -e '.[test]'")
from fastapi.testclient import TestClient  # noqa: E402

from finealign.cli import main  # noqa: E402
from finealign.serve import build  # noqa: E402
from finealign.serve.app import MAX_TEXT  # noqa: E402
from finealign.serve.gallery import list_images  # noqa: E402

N = 8


def train_tiny(run, recipe="coca", steps=150, n=N):
    """CoCa on ``n`` shapes scenes, full batch, no augmentation: 150 steps memorise them (measured:
    8/8 captions retrieve their image, caption loss 0.06)."""
    assert main(["train", recipe, "data.source=shapes", f"data.num_samples={n}", f"data.batch_size={n}",
                 f"train.steps={steps}", "train.lr=1e-3", "train.warmup=10", "train.ckpt_every=0",
                 "train.log_every=50", "data.augment=false", "tokenizer.vocab_size=300", f"train.run_dir={run}",
                 "--no-progress"]) == 0
    return run


def shared_trained_run(tmp_path_factory):
    """The memorising CoCa run, trained once per test session (tests/test_browser.py uses it too)."""
    run = tmp_path_factory.getbasetemp() / "serve-coca"
    if not (run / "trained.ok").exists():
        shutil.rmtree(run, ignore_errors=True)
        train_tiny(run)
        (run / "trained.ok").write_text("ok")
    return run


def write_gallery(run, out, with_captions=True):
    """The run's training images as PNGs (+ captions.jsonl); returns their captions in file order."""
    import finealign
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    cfg = finealign.load(run).config
    out.mkdir(parents=True, exist_ok=True)
    caps = []
    for i, s in enumerate(build_source(cfg.data, cfg.data.train, SkipLog())):
        s.load_image().save(out / f"{i:02d}.png")
        caps.append(s.captions[0])
    if with_captions:
        (out / "captions.jsonl").write_text("".join(json.dumps({"image": f"{i:02d}.png", "caption": c}) + "\n"
                                                    for i, c in enumerate(caps)))
    return caps


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run = shared_trained_run(tmp_path_factory)
    caps = write_gallery(run, root / "gallery")
    app, gallery = build(run, root / "gallery", cache=root / "cache")
    return {"run": run, "root": root, "captions": caps, "client": TestClient(app), "gallery": gallery}


def png_bytes(path):
    return path.read_bytes()


def test_search_returns_the_right_image(served):
    client, caps = served["client"], served["captions"]
    hits = 0
    for i, cap in enumerate(caps):
        r = client.get("/api/search", params={"q": cap, "k": 3})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert len(res) == 3 and [x["rank"] for x in res] == [1, 2, 3]
        assert res[0]["score"] >= res[1]["score"] >= res[2]["score"]
        hits += res[0]["name"] == f"{i:02d}.png"
    assert hits >= N - 1, f"only {hits}/{N} captions retrieve their own image"       # chance: 1/8
    top = client.get("/api/search", params={"q": caps[0]}).json()["results"][0]
    img = client.get(top["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (served["root"] / "gallery" / top["name"]).read_bytes()


def test_caption_and_closest_captions(served):
    client, caps, gal = served["client"], served["captions"], served["root"] / "gallery"
    own, first = 0, None
    for i in range(N):
        r = client.post("/api/caption", files={"file": ("x.png", png_bytes(gal / f"{i:02d}.png"), "image/png")})
        assert r.status_code == 200, r.text
        out = r.json()
        first = first or out
        assert out["captioner"] == "decoder" and len(out["captions"]) == 1 and out["captions"][0].strip()
        assert out["closest_source"] == "gallery: captions.jsonl" and len(out["closest"]) == 5
        own += out["closest"][0]["caption"] == caps[i]
        # the memorised decoder starts the scene's own caption (greedy/beam, max_new_tokens words)
        own_words = caps[i].split()
        assert out["captions"][0].split()[:3] == own_words[:3], (out["captions"], caps[i])
    assert own >= N - 1
    # the form field k sets how many closest captions come back: the top 2 of the default 5
    r = client.post("/api/caption", files={"file": ("x.png", png_bytes(gal / "00.png"), "image/png")},
                    data={"k": "2"})
    assert r.status_code == 200, r.text
    assert [c["caption"] for c in r.json()["closest"]] == [c["caption"] for c in first["closest"][:2]]


def test_info_describes_the_model_and_the_gallery(served):
    info = served["client"].get("/api/info").json()
    assert info["captioner"] == "decoder" and info["max_upload_bytes"] == 8 * 1024 * 1024   # the 8 MB default
    g = info["gallery"]
    assert g["images"] == N and g["skipped"] == [] and g["captions"] == len(set(served["captions"]))
    assert g["captions_source"] == "gallery: captions.jsonl" and g["from_cache"] is False
    assert g["root"] == str((served["root"] / "gallery").resolve())
    assert g["cache_file"] == str(served["gallery"].cache_file)


def test_relevance_map(served):
    gal = served["root"] / "gallery"
    r = served["client"].post("/api/relevance", files={"file": ("x.png", png_bytes(gal / "00.png"), "image/png")},
                              data={"text": "a large green triangle"})
    assert r.status_code == 200, r.text
    out = r.json()
    g = out["grid"]
    assert g == 8 and len(out["relevance"]) == g and all(len(row) == g for row in out["relevance"])
    head = "data:image/png;base64,"
    assert out["overlay"].startswith(head)
    import base64
    with Image.open(io.BytesIO(base64.b64decode(out["overlay"][len(head):]))) as im:
        assert im.size == (256, 256)


def test_bad_uploads_and_queries_get_4xx_with_a_message(served, tmp_path):
    client = served["client"]

    def post(name, data, path="/api/caption", **extra):
        return client.post(path, files={"file": (name, data, "image/png")}, data=extra)
    r = post("empty.png", b"")
    assert r.status_code == 400 and "empty.png: the upload is empty" in r.json()["detail"]
    r = post("notes.png", b"this is text, not a picture")
    assert r.status_code == 415 and "notes.png: not an image" in r.json()["detail"]
    good = png_bytes(served["root"] / "gallery" / "00.png")
    r = post("cut.png", good[: len(good) // 2])
    assert r.status_code == 415 and "cut.png" in r.json()["detail"]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    r = post("x.tif", buf.getvalue())
    assert r.status_code == 415 and "format TIFF is not accepted" in r.json()["detail"]
    r = post("x.png", good, path="/api/relevance", text="   ")
    assert r.status_code == 400 and r.json()["detail"] == "text is empty"
    r = client.get("/api/search", params={"q": " "})
    assert r.status_code == 400 and r.json()["detail"] == "query is empty"
    # texts are limited to MAX_TEXT characters (the limit itself is accepted)
    assert client.get("/api/search", params={"q": "x" * MAX_TEXT}).status_code == 200
    r = client.get("/api/search", params={"q": "x" * (MAX_TEXT + 1)})
    assert r.status_code == 400
    assert r.json()["detail"] == f"query is {MAX_TEXT + 1} characters long; the limit is {MAX_TEXT}"
    r = post("x.png", good, path="/api/relevance", text="y" * (MAX_TEXT + 1))
    assert r.status_code == 400 and f"the limit is {MAX_TEXT}" in r.json()["detail"]
    # k is 1..100
    r = client.get("/api/search", params={"q": "a red circle", "k": 100})
    assert r.status_code == 200 and len(r.json()["results"]) == N
    for k in (0, 101):
        assert client.get("/api/search", params={"q": "a red circle", "k": k}).status_code == 422
    r = client.get("/api/gallery/99")
    assert r.status_code == 404 and "no gallery image 99" in r.json()["detail"]
    r = client.get("/api/gallery/-1")                     # not Python's "last item"
    assert r.status_code == 404 and "no gallery image -1" in r.json()["detail"]
    r = client.get(f"/api/gallery/{N}")
    assert r.status_code == 404 and client.get(f"/api/gallery/{N - 1}").status_code == 200
    r = client.get("/api/gallery/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code in (404, 422)
    # the size limit is a flag (--max-upload-mb): 2 KiB here, the PNG is bigger
    big = Image.effect_noise((64, 64), 64).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    app, _ = build(served["run"], served["root"] / "gallery", cache=served["root"] / "cache", max_upload_mb=2 / 1024)
    r = TestClient(app).post("/api/caption", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "over the size limit of 2048 bytes" in r.json()["detail"]
    # an upload of exactly the limit is accepted, one byte more is not
    app, _ = build(served["run"], served["root"] / "gallery", cache=served["root"] / "cache",
                   max_upload_mb=len(good) / 2**20)                              # exact: a power of 2
    exact = TestClient(app)
    assert exact.get("/api/info").json()["max_upload_bytes"] == len(good)
    r = exact.post("/api/caption", files={"file": ("exact.png", good, "image/png")})
    assert r.status_code == 200, r.text
    r = exact.post("/api/caption", files={"file": ("over.png", good + b"\0", "image/png")})
    assert r.status_code == 413 and f"size limit of {len(good)} bytes" in r.json()["detail"]


def test_openapi_schema_lists_the_api(served):
    paths = served["client"].get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/caption", "/api/relevance", "/api/gallery/{index}", "/api/info"} <= set(paths)
    page = served["client"].get("/")
    assert page.status_code == 200 and "<form id=\"search-form\">" in page.text
    assert "http://" not in page.text and "https://" not in page.text           # no external assets


def test_gallery_cache_is_reused_and_invalidated(served):
    root = served["root"]
    first = served["gallery"]
    assert not first.from_cache and first.cache_file.is_file()
    stamp = first.cache_file.stat().st_mtime_ns
    _, again = build(served["run"], root / "gallery", cache=root / "cache")
    assert again.from_cache and again.cache_file == first.cache_file and again.names == first.names
    assert first.cache_file.stat().st_mtime_ns == stamp                       # not rewritten
    assert (again.embeds == first.embeds).all() and again.captions == first.captions
    # a touched file changes the key: embedded again, into another cache file
    p = root / "gallery" / "03.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, touched = build(served["run"], root / "gallery", cache=root / "cache")
    assert not touched.from_cache and touched.cache_file != first.cache_file
    # an added image (and an unreadable one, skipped and reported) too
    Image.new("RGB", (64, 64), (220, 40, 40)).save(root / "gallery" / "99_red.png")
    (root / "gallery" / "98_broken.png").write_bytes(b"not a png")
    _, grown = build(served["run"], root / "gallery", cache=root / "cache")
    assert not grown.from_cache and len(grown.names) == N + 1 and "99_red.png" in grown.names
    assert [s[0] for s in grown.skipped] == ["98_broken.png"] and "cannot read image" in grown.skipped[0][1]
    _, cached = build(served["run"], root / "gallery", cache=root / "cache")
    assert cached.from_cache and cached.skipped == grown.skipped
    # images under a hidden directory are not part of the gallery: the cache stays valid
    (root / "gallery" / ".thumbs").mkdir()
    Image.new("RGB", (64, 64), (40, 40, 220)).save(root / "gallery" / ".thumbs" / "00.png")
    _, hidden = build(served["run"], root / "gallery", cache=root / "cache")
    assert hidden.from_cache and hidden.names == grown.names
    # rewritten captions.jsonl: embedded again, with the new caption candidates
    caps = [c + ", drawn again" for c in served["captions"]]
    (root / "gallery" / "captions.jsonl").write_text(
        "".join(json.dumps({"image": f"{i:02d}.png", "caption": c}) + "\n" for i, c in enumerate(caps)))
    _, recap = build(served["run"], root / "gallery", cache=root / "cache")
    assert not recap.from_cache and recap.cache_file != cached.cache_file
    assert recap.captions == list(dict.fromkeys(caps)) and recap.caption_embeds.shape[0] == len(recap.captions)


def test_gallery_lists_images_but_not_hidden_files(tmp_path):
    for rel in ("b.png", "sub/a.JPG", ".thumbs/x.png", "sub/.cache/y.png", ".hidden.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["b.png", "sub/a.JPG"]


def test_clip_has_no_captioner_and_falls_back_to_the_training_captions(tmp_path):
    run = train_tiny(tmp_path / "clip", recipe="clip", steps=2)
    write_gallery(run, tmp_path / "gallery", with_captions=False)
    app, g = build(run, tmp_path / "gallery", cache=tmp_path / "cache")
    assert g.captions_source == "training dataset: shapes test" and len(g.captions) > 0
    client = TestClient(app)
    assert client.get("/api/info").json()["captioner"] is None
    r = client.post("/api/caption", files={"file": ("x.png", (tmp_path / "gallery" / "00.png").read_bytes(),
                                                    "image/png")})
    out = r.json()
    assert r.status_code == 200 and out["captions"] == [] and "has no captioner" in out["message"]
    assert len(out["closest"]) == 5 and all(c["caption"] in g.captions for c in out["closest"])


def test_serve_verb_and_missing_gallery(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--gallery" in capsys.readouterr().out
    run = tmp_path / "nope"
    assert main(["serve", str(run), "--gallery", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_maccap_checkpoint_serves_zero_shot_captions(tmp_path):
    """A MacCap run (text-only trained on a tiny CLIP backbone): /api/caption gives its zero-shot captions,
    /api/relevance uses the backbone's patch-text relevance."""
    from finealign.config import load_config
    from finealign.train.loop import Trainer
    bb = train_tiny(tmp_path / "bb", recipe="clip", steps=1)
    run = tmp_path / "maccap"
    Trainer(load_config("maccap", [f"maccap.backbone={bb}", "train.steps=2", f"train.run_dir={run}",
                                   "data.num_samples=16", "data.batch_size=8", "maccap.adaptor_width=32",
                                   "maccap.adaptor_heads=2", "maccap.queries=4", "maccap.copies=2", "lm.width=32",
                                   "lm.layers=1", "lm.heads=2", "maccap.samples=2", "eval.max_new_tokens=4"]),
            progress=False).train()
    write_gallery(bb, tmp_path / "gallery")
    app, g = build(run, tmp_path / "gallery", cache=tmp_path / "cache")
    # another checkpoint (the backbone) over the same gallery and cache dir embeds it again
    _, other = build(bb, tmp_path / "gallery", cache=tmp_path / "cache")
    assert not other.from_cache and other.cache_file != g.cache_file
    assert build(run, tmp_path / "gallery", cache=tmp_path / "cache")[1].from_cache
    client = TestClient(app)
    assert client.get("/api/info").json()["captioner"] == "maccap"
    img = (tmp_path / "gallery" / "00.png").read_bytes()
    out = client.post("/api/caption", files={"file": ("x.png", img, "image/png")}).json()
    assert out["captioner"] == "maccap" and "zero-shot MacCap" in out["message"]
    assert len(out["captions"]) == 1 and isinstance(out["captions"][0], str) and len(out["closest"]) == 5
    r = client.post("/api/relevance", files={"file": ("x.png", img, "image/png")}, data={"text": "a red circle"})
    assert r.status_code == 200 and r.json()["grid"] == 8
