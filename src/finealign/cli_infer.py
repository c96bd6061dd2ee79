"""The ``finealign`` verbs that load a checkpoint and run it: ``eval``, ``caption``, ``retrieve``
(their arguments are declared in ``cli.build_parser``)."""
from __future__ import annotations

import glob
import json
from pathlib import Path


def cmd_eval(args) -> int:
    from .api import load
    from .config import ConfigError, from_dict, merge, parse_overrides
    from .eval.runner import evaluate, format_results
    from .eval.vqa import can_answer
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory: give the results file (e.g. {Path(args.out) / 'eval.json'})")
    loaded = load(args.checkpoint)
    asked = set(args.task or ())
    if "caption" in asked and getattr(loaded.model, "decoder", None) is None:
        raise ValueError(f"--task caption: {loaded.path} has no caption decoder (model.decoder_layers=0, e.g. CLIP)")
    if "vqa" in asked and not can_answer(loaded.model):
        raise ValueError(f"--task vqa: {loaded.path} cannot answer questions (zero-shot VQA needs a MacCap run)")
    extra = parse_overrides(args.overrides)
    fixed = sorted({f"{k}.*" for k in extra if k not in ("data", "eval", "maccap", "train")}
                   | {f"train.{k}" for k in extra.get("train", {}) if k != "seed"})
    if fixed:       # the model, its tokenizer and its training were fixed when the checkpoint was written
        raise ConfigError(f"eval: {', '.join(fixed)} cannot change for a trained model (it is built from the "
                          f"checkpoint's config); eval takes data.*, eval.*, train.seed and MacCap's inference keys")
    data = extra.setdefault("data", {})
    if args.data:
        data["root"] = args.data
    if args.source:
        data["source"] = args.source
    if args.strict:
        data["strict"] = True
    cfg = from_dict(merge(loaded.config.to_dict(), extra))
    from .config_checks import PROCEDURAL_SOURCES
    if args.data and cfg.data.source in PROCEDURAL_SOURCES:
        raise ConfigError(f"--data {args.data}: data.source={cfg.data.source} is generated in memory and reads no "
                          f"files; name the files' format with --source (emoji, csv, jsonl, coco, webdataset)")
    if extra.get("maccap"):
        if not callable(getattr(loaded.model, "set_inference", None)):
            raise ValueError(f"maccap.* overrides apply to MacCap runs; {loaded.path} is not one")
        loaded.model.set_inference(**extra["maccap"])      # the model was built from the checkpoint's config
    split = args.split or cfg.data.test
    from .distributed import destroy, info, init_distributed
    had_group = info().enabled
    world = init_distributed(device="cpu")      # under torchrun: a gloo group, the split shared by ranks
    try:
        res = evaluate(loaded.model, loaded.tokenizer, cfg, split=split, tasks=args.task,
                       progress=not args.no_progress)
    finally:
        if world.enabled and not had_group:
            destroy()
    if not world.is_main:                       # every rank holds the same results; rank 0 reports
        return 0
    print(format_results(res))
    out = Path(args.out) if args.out else loaded.path / f"eval_{Path(split).stem}.json"
    res["evaluated_on"] = {"split": split, "source": cfg.data.source, "root": cfg.data.root,
                           "max_images": cfg.eval.max_images}
    kept = _merge_earlier(out, res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"results written to {out}" + (f" (kept its earlier {', '.join(kept)} results)" if kept else ""))
    return 0


def _merge_earlier(out: Path, res: dict) -> list[str]:
    """Keep the tasks of an earlier results file that this evaluation did not run (``--task A`` then
    ``--task B`` gives one file with both), when they were measured on the same data; returns their names."""
    from .eval.runner import TASKS
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("evaluated_on") != res["evaluated_on"]:
        return []
    kept = [t for t in TASKS if t in old and t not in res]
    for t in kept:
        res[t] = old[t]
    if "caption" in kept and "samples" in old:
        res["samples"] = old["samples"]
    return kept


def _load_images(paths, size):
    from PIL import Image
    import torch
    from .data.transforms import ImageTransform, to_rgb
    tf = ImageTransform(size, train=False)
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                out.append(tf(to_rgb(im)))
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: cannot read image ({e})") from None
    return torch.stack(out)


def cmd_caption(args) -> int:
    import torch
    from .api import load
    loaded = load(args.checkpoint)
    if args.zero_shot and loaded.config.model.arch != "maccap":
        raise ValueError(f"{loaded.path}: --zero-shot needs a MacCap run (finealign train maccap "
                         f"maccap.backbone=...), this is model.arch={loaded.config.model.arch}")
    if getattr(loaded.model, "decoder", None) is None:
        raise ValueError(f"{loaded.path}: this model has no caption decoder (trained with decoder_layers=0)")
    cfg, tok = loaded.config, loaded.tokenizer
    images = _load_images(args.images, cfg.model.image_size)
    decoding = {**cfg.eval.decoding(), "strategy": args.decode or cfg.eval.decode}
    if args.num > 1 and decoding["strategy"] != "top_p" and cfg.model.arch != "maccap":
        raise ValueError(f"--num {args.num}: {decoding['strategy']} decoding gives one caption per image, the same "
                         f"every time; sample several with --decode top_p")
    gen = torch.Generator().manual_seed(args.seed)
    for n in range(args.num):
        ids = loaded.model.generate(images, tok.bos_id, tok.eos_id, tok.pad_id, **decoding, generator=gen)
        for path, row in zip(args.images, ids):
            print(f"{path}\t{tok.decode(row.tolist())}")
    return 0


def cmd_retrieve(args) -> int:
    import torch
    from .api import load
    from .eval.runner import embed_texts
    loaded = load(args.checkpoint)
    cfg, model, tok = loaded.config, loaded.model, loaded.tokenizer
    if args.query:
        if not args.images:
            raise ValueError("--query needs --images DIR (the gallery to search)")
        root = Path(args.images)
        found = root.iterdir() if root.is_dir() else map(Path, glob.glob(args.images))   # absolute globs too
        paths = sorted(p for p in found if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not paths:
            raise FileNotFoundError(f"no images found in {args.images}")
        with torch.no_grad():
            img = torch.cat([model.encode_image(_load_images(paths[i:i + 256], cfg.model.image_size))["embed"]
                             for i in range(0, len(paths), 256)])
            q = embed_texts(model, tok, [args.query], cfg.model.context_length, "cpu")
        scores = (q @ img.t())[0]
        for s, i in zip(*scores.topk(min(args.k, len(paths)))):
            print(f"{s:.3f}\t{paths[i]}")
        return 0
    if args.image:
        from .data.loader import build_source
        from .data.skips import SkipLog
        data = cfg.data
        if args.captions_from:
            from .config_checks import PROCEDURAL_SOURCES
            if data.source in PROCEDURAL_SOURCES:
                raise ValueError(f"--captions-from {args.captions_from}: this model's data.source={data.source} is "
                                 f"generated in memory and reads no files; its own captions are ranked without it")
            data.root = args.captions_from
        texts = sorted({c for s in build_source(data, data.test, SkipLog()) for c in s.captions})
        with torch.no_grad():
            img = model.encode_image(_load_images([args.image], cfg.model.image_size))["embed"]
            txt = embed_texts(model, tok, texts, cfg.model.context_length, "cpu")
        scores = (img @ txt.t())[0]
        for s, i in zip(*scores.topk(min(args.k, len(texts)))):
            print(f"{s:.3f}\t{texts[i]}")
        return 0
    raise ValueError("give --query TEXT --images DIR, or --image PATH")
