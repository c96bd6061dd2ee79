"""The FastAPI app of ``finealign serve``: one HTML page and a JSON API under ``/api/``.

``create_app(loaded, gallery)`` takes ``finealign.load``'s result and an embedded :class:`Gallery`.
Endpoints (the OpenAPI schema is at ``/openapi.json``, the interactive docs at ``/docs``):

* ``GET  /api/info``                 model, captioner and gallery summary
* ``GET  /api/search?q=TEXT&k=8``    the gallery's top-k images for a text query
* ``POST /api/caption``              (multipart ``file``) generated caption(s) + the closest candidate captions
* ``POST /api/relevance``            (multipart ``file``, ``text``) the patch-text relevance map
* ``GET  /api/gallery/{index}``      a gallery image (by index: no path from the client reaches the disk)

Uploads are read up to ``max_upload_bytes`` (413 past it), must be non-empty (400) and must be an image
PIL verifies and decodes, in one of ``ALLOWED_FORMATS`` (415), below PIL's decompression-bomb limit
(413). Model calls are serialised by a lock (one forward pass at a time; requests run in FastAPI's
thread pool).
"""
from __future__ import annotations

import base64
import io
import threading

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from .gallery import Gallery
from .page import PAGE

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
MAX_TEXT = 500
DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024


def captioner_kind(loaded) -> str | None:
    """"maccap" (zero-shot MacCap captions), "decoder" (the model's own caption decoder) or None."""
    if loaded.config.model.arch == "maccap":
        return "maccap"
    return "decoder" if getattr(loaded.model, "decoder", None) is not None else None


def _check_text(text: str, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise HTTPException(400, f"{what} is empty")
    if len(text) > MAX_TEXT:
        raise HTTPException(400, f"{what} is {len(text)} characters long; the limit is {MAX_TEXT}")
    return text


def read_upload(data: bytes, filename: str, max_bytes: int):
    """Upload bytes -> RGB PIL image, or an HTTPException (4xx) saying what is wrong."""
    from PIL import Image
    name = filename or "upload"
    if not data:
        raise HTTPException(400, f"{name}: the upload is empty (0 bytes)")
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: the upload is over the size limit of {max_bytes} bytes "
                                 f"(finealign serve --max-upload-mb)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        if fmt not in ALLOWED_FORMATS:
            raise HTTPException(415, f"{name}: image format {fmt} is not accepted "
                                     f"(accepted: {', '.join(sorted(ALLOWED_FORMATS))})")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            from ..data.transforms import to_rgb
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: image has too many pixels ({e})") from None
    except HTTPException:
        raise
    except Image.UnidentifiedImageError:
        raise HTTPException(415, f"{name}: not an image (PIL does not recognise the format; accepted: "
                                 f"{', '.join(sorted(ALLOWED_FORMATS))})") from None
    except Exception as e:     # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad bytes
        raise HTTPException(415, f"{name}: not an image PIL can read ({type(e).__name__}: {e})") from None


def overlay_png(image: torch.Tensor, relevance: torch.Tensor, side: int = 256) -> bytes:
    """The (denormalised) image with the (g, g) relevance map blended over it, as PNG bytes."""
    import matplotlib
    import numpy as np
    from PIL import Image
    from ..data.transforms import denormalize
    rel = relevance.float()
    rel = (rel - rel.min()) / (rel.max() - rel.min()).clamp_min(1e-8)
    heat = matplotlib.colormaps["inferno"](rel.numpy())[..., :3]                     # (g, g, 3)
    heat = Image.fromarray((heat * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
    img = (denormalize(image).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    img = Image.fromarray(img).resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    Image.blend(img, heat, 0.55).save(buf, format="PNG")
    return buf.getvalue()


def create_app(loaded, gallery: Gallery, max_upload_bytes: int = DEFAULT_MAX_UPLOAD) -> FastAPI:
    from ..eval.runner import embed_texts
    from ..data.transforms import ImageTransform
    cfg, model, tok = loaded.config, loaded.model, loaded.tokenizer
    transform = ImageTransform(cfg.model.image_size, train=False)
    lock = threading.Lock()
    kind = captioner_kind(loaded)
    app = FastAPI(title="finealign serve", version="1",
                  description="Search a gallery by text, caption an image, see patch-text relevance.")

    async def upload_tensor(file: UploadFile) -> torch.Tensor:
        data = await file.read(max_upload_bytes + 1)
        return await run_in_threadpool(lambda: transform(read_upload(data, file.filename, max_upload_bytes)))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/api/info")
    def info() -> dict:
        return {"checkpoint": str(loaded.path), "arch": cfg.model.arch, "captioner": kind,
                "image_size": cfg.model.image_size, "max_upload_bytes": max_upload_bytes,
                "gallery": gallery.info()}

    @app.get("/api/search")
    def search(q: str = Query(..., description="text query"), k: int = Query(8, ge=1, le=100)) -> dict:
        q = _check_text(q, "query")
        with lock, torch.no_grad():
            emb = embed_texts(model, tok, [q], cfg.model.context_length, "cpu")
        scores = (emb @ gallery.embeds.t())[0]
        top = scores.topk(min(k, len(gallery.names)))
        return {"query": q, "results": [
            {"rank": r + 1, "index": int(i), "name": gallery.names[int(i)], "score": round(float(s), 4),
             "url": f"/api/gallery/{int(i)}"} for r, (s, i) in enumerate(zip(*top))]}

    @app.post("/api/caption")
    async def caption(file: UploadFile = File(..., description="image (PNG, JPEG, WEBP, BMP, GIF)"),
                      k: int = Form(5, ge=1, le=50)) -> dict:
        image = (await upload_tensor(file))[None]
        return await run_in_threadpool(_caption, image, k)

    def _caption(image: torch.Tensor, k: int) -> dict:
        out: dict = {"captioner": kind, "captions": []}
        with lock, torch.no_grad():
            if kind == "maccap":
                out["captions"] = model.caption_images(image, **cfg.eval.decoding())
            elif kind == "decoder":
                ids = model.generate(image, tok.bos_id, tok.eos_id, tok.pad_id, **cfg.eval.decoding(),
                                     generator=torch.Generator().manual_seed(0))
                out["captions"] = [tok.decode(row.tolist()) for row in ids]
            emb = model.encode_image(image)["embed"].float()
        out["message"] = {"maccap": "zero-shot MacCap caption (text-only trained decoder)",
                          "decoder": "the model's caption decoder",
                          None: f"this checkpoint (model.arch={cfg.model.arch}) has no captioner: "
                                f"only the closest captions are shown"}[kind]
        out["closest_source"] = gallery.captions_source
        out["closest"] = []
        if gallery.captions:
            scores = (emb @ gallery.caption_embeds.t())[0]
            top = scores.topk(min(k, len(gallery.captions)))
            out["closest"] = [{"caption": gallery.captions[int(i)], "score": round(float(s), 4)}
                              for s, i in zip(*top)]
        return out

    @app.post("/api/relevance")
    async def relevance(file: UploadFile = File(..., description="image"),
                        text: str = Form(..., description="text the patches are scored against")) -> dict:
        text = _check_text(text, "text")
        image = await upload_tensor(file)
        from ..analysis.viz import mask_panels
        net = getattr(model, "backbone", None) if cfg.model.arch == "maccap" else model
        if net is None or not hasattr(net, "patch_text_relevance"):
            raise HTTPException(422, f"model.arch={cfg.model.arch} has no patch-text relevance")

        def run():
            with lock:
                return mask_panels(net, tok, cfg, image, text)["relevance"]
        rel = await run_in_threadpool(run)
        png = base64.b64encode(overlay_png(image, rel)).decode()
        return {"text": text, "grid": int(rel.shape[0]), "relevance": [[round(float(v), 5) for v in row]
                                                                       for row in rel],
                "overlay": f"data:image/png;base64,{png}"}

    @app.get("/api/gallery/{index}", response_class=FileResponse)
    def gallery_image(index: int):
        if not 0 <= index < len(gallery.names):
            raise HTTPException(404, f"no gallery image {index} (the gallery has {len(gallery.names)})")
        return FileResponse(gallery.path_of(index))

    return app
