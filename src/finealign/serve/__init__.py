"""``finealign serve CKPT --gallery DIR``: a local demo web app (FastAPI + uvicorn, 127.0.0.1 by default).

Search a gallery by text, caption an uploaded image (MacCap zero-shot captions for MacCap checkpoints,
the caption decoder for CoCa-style ones, none for CLIP) with its closest candidate captions, and see the
patch-text relevance map of an image and a text. The gallery is embedded once and cached on disk
(gallery.py); the page and the JSON API under ``/api/`` are in app.py / page.py. Needs the ``serve``
extra (``pip install 'finealign[serve]'``).
"""
from __future__ import annotations

import logging

log = logging.getLogger("finealign")


def build(checkpoint, gallery, cache=None, max_upload_mb: float = 8.0):
    """(FastAPI app, Gallery) for ``checkpoint`` (anything ``finealign.load`` reads) and a gallery dir."""
    from ..api import load
    from .app import create_app
    from .gallery import load_gallery
    loaded = load(checkpoint)
    g = load_gallery(loaded, gallery, cache)
    return create_app(loaded, g, int(max_upload_mb * 1024 * 1024)), g


def check_listen(host: str, port: int) -> None:
    """Refuse a port that is out of range, or that this host cannot listen on (in use, not permitted)."""
    import socket
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be in 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
            sock.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ValueError(f"finealign serve needs the serve extra: pip install 'finealign[serve]' ({e})") from None
    check_listen(args.host, args.port)          # before the (possibly long) gallery embedding
    app, g = build(args.checkpoint, args.gallery, args.cache, args.max_upload_mb)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines (no authentication)", args.host)
    print(f"gallery: {len(g.names)} images ({'from cache' if g.from_cache else 'embedded'}); "
          f"open http://{args.host}:{args.port}/  (API schema: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
