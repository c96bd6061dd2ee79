"""``finealign <verb>``: data build / shard, train, eval, caption, retrieve, quickstart, recipes.

``main(argv)`` returns an exit code so tests can call it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("finealign")


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted config overrides, e.g. train.steps=200 model.vision_width=256")


def _at_least(low, kind=int):
    """An argparse type: a number of ``kind`` that is >= ``low`` (else a usage error naming the option)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="finealign", description="Fine-grained vision-language alignment.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("data", help="build datasets, or write any source as webdataset shards")
    dsub = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="build a dataset on disk (emoji)")
    b.add_argument("name", choices=["emoji"], help="dataset to build")
    b.add_argument("--out", default="data/emoji", help="output directory (default: data/emoji)")
    b.add_argument("--font", default=None, help="colour emoji font (default: system Noto Color Emoji)")
    b.add_argument("--size", type=_at_least(8), default=64, help="image side in pixels")
    b.add_argument("--seed", type=int, default=0, help="split seed")
    b = dsub.add_parser("shard", help="write a split of any registered source as webdataset shards",
                        description="Write split --split of source --source as tar shards (read back with "
                                    "data.source=webdataset; see docs/scaling.md).")
    b.add_argument("--source", required=True, help="registered source: shapes, emoji, csv, tsv, jsonl, coco, ...")
    b.add_argument("--root", default=None, help="the source's data.root (dataset directory or file)")
    b.add_argument("--split", default="train", help="split name (train/val/test) or split value (default: train)")
    b.add_argument("--out", required=True, help="shard pattern with a printf field, e.g. shards/train-%%06d.tar")
    b.add_argument("--maxcount", type=_at_least(1), default=1000, help="samples per shard (default: 1000)")
    b.add_argument("--image-format", choices=["png", "jpg", "webp"], default="png", help="image encoding (default: png)")
    b.add_argument("--force", action="store_true", help="replace shards that already match --out (all of them)")
    _overrides(b)

    p = sub.add_parser("train", help="train a recipe", description="Train RECIPE (a name in configs/ or a YAML path).")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path (omit with --resume RUN_DIR)")
    p.add_argument("--resume", default=None, help="a run dir or one of its checkpoint dirs (the run continues in "
                   "that run dir, with its own config.yaml and the overrides on top), or 'latest' with "
                   "train.run_dir=DIR")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _overrides(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Evaluate CKPT (checkpoint or run dir).")
    p.add_argument("checkpoint")
    p.add_argument("--task", action="append", choices=["retrieval", "caption", "classify", "tgir", "vqa"],
                   help="task(s) to run (repeatable; default: the recipe's eval.tasks)")
    p.add_argument("--data", default=None, help="dataset root (default: the training config's data.root)")
    p.add_argument("--source", default=None, help="data source (default: the training config's)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.test)")
    p.add_argument("--out", default=None, help="write results JSON here (default: eval_<split>.json in the checkpoint "
                   "evaluated: a run dir's latest checkpoint, or the export / model dir itself)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _overrides(p)

    p = sub.add_parser("caption", help="caption images with a trained captioner")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--decode", choices=["greedy", "beam", "top_p"], default=None,
                   help="decoding strategy (default: the run's eval.decode)")
    p.add_argument("--num", type=_at_least(1), default=1, help="captions per image (top_p sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (top_p, MacCap noise) (default: 0)")
    p.add_argument("--zero-shot", action="store_true",
                   help="require a MacCap run (text-only training): subregions, N noisy samples, re-ranking")

    p = sub.add_parser("retrieve", help="search images by text, or captions by image")
    p.add_argument("checkpoint")
    p.add_argument("--query", help="text query: rank the images of --images")
    p.add_argument("--images", help="directory or glob (quote it) of gallery images")
    p.add_argument("--image", help="image query: rank the captions of --captions-from's split")
    p.add_argument("--captions-from", default=None, help="dataset root whose test captions are ranked "
                   "(default: the checkpoint's data.root)")
    p.add_argument("-k", type=_at_least(1), default=5, help="results shown (default: 5)")

    p = sub.add_parser("quickstart", help="build emoji data, train CoCa (tiny) ~5 min on CPU, evaluate")
    p.add_argument("--out", default=None, help="run directory (default: runs/quickstart-<time>)")
    p.add_argument("--data", default="data/emoji", help="where the emoji dataset is (built if missing)")
    p.add_argument("--steps", type=_at_least(1), default=None, help="training steps (default: the quickstart recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _overrides(p)

    p = sub.add_parser("viz", help="visualise masks, prototypes, image mixing or an ablation study")
    vsub = p.add_subparsers(dest="viz_verb", metavar="WHAT", required=True)
    v = vsub.add_parser("masks", help="relevance map, masked patches (IC / TG-MIM / synchronized / SemMIM), "
                                      "reconstruction or prototypes")
    v.add_argument("checkpoint")
    v.add_argument("--image", required=True, help="image file")
    v.add_argument("--text", required=True, help="caption the relevance is computed against")
    v.add_argument("--out", default="masks.png", help="PNG to write (default: masks.png)")
    v = vsub.add_parser("prototypes", help="SemMIM: the patches closest to the most used prototypes")
    v.add_argument("checkpoint")
    v.add_argument("--images", required=True, help="directory of .png/.jpg images")
    v.add_argument("--out", default="prototypes.png", help="PNG to write (default: prototypes.png)")
    v.add_argument("--num", type=_at_least(1), default=8, help="prototypes shown: the most used ones (default: 8)")
    v.add_argument("--top", type=_at_least(1), default=6, help="patches shown per prototype (default: 6)")
    v = vsub.add_parser("mix", help="TiMix / CutMix / Mixup: target, source, patch scores, windows, mixed image, λ")
    v.add_argument("checkpoint")
    v.add_argument("--split", default="val", help="split of the run's data source to draw pairs from (default: val)")
    v.add_argument("--num", type=_at_least(1), default=4, help="images (rows) (default: 4)")
    v.add_argument("--mixer", default=None, choices=["timix", "cutmix", "mixup"],
                   help="mixer to show (default: the run's, else timix)")
    v.add_argument("--seed", type=int, default=0, help="seed of the window-side / λ draw")
    v.add_argument("--out", default="mix.png", help="PNG to write (default: mix.png)")
    v = vsub.add_parser("study", help="an ablation study's metric against its varied key, one line per series")
    v.add_argument("results", help="results.json written by finealign ablate (or its directory)")
    v.add_argument("--x", default="data.fraction", help="varied key on the x axis (default: data.fraction)")
    v.add_argument("--metric", default="t2i_r1", help="metric key, e.g. t2i_r1, i2t_r1, mean_recall (default: t2i_r1)")
    v.add_argument("--out", default="study.png", help="PNG to write (default: study.png)")

    p = sub.add_parser("analyze", help="analyses of a trained checkpoint (modality gap)")
    asub = p.add_subparsers(dest="analyze_verb", metavar="WHAT", required=True)
    a = asub.add_parser("gap", help="image-text modality gap: σ², histogram, QQ plot, subregions vs global",
                        description="Embed a split with CKPT (checkpoint or run dir) and write gap.json "
                                    "(suggested_noise_var for maccap.noise_var=auto) and plots.")
    a.add_argument("checkpoint")
    a.add_argument("--split", default=None, help="split to embed (default: data.test)")
    a.add_argument("--out", default=None, help="output directory (default: <run dir>/gap/)")
    a.add_argument("--max-images", type=_at_least(1), default=None, help="use at most N images (default: all)")
    a.add_argument("-k", type=_at_least(0), default=10, help="subregions per image (default: 10)")
    a.add_argument("-w", type=float, default=1.0, help="aggregation weight: normalise(g + w·s) (default: 1)")
    a.add_argument("--no-progress", action="store_true")
    _overrides(a)

    from .ablate import add_ablate_parser
    add_ablate_parser(sub)
    from .report import add_report_parser
    add_report_parser(sub)

    p = sub.add_parser("export", help="write a model as model.safetensors + config.yaml + tokenizer.json "
                                       "(+ export.json)",
                       description="Export SRC (run or checkpoint dir, export, or Hugging Face CLIPModel dir) to "
                                   "OUT_DIR; finealign.load(OUT_DIR) reads it back.")
    p.add_argument("checkpoint", metavar="SRC")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing export in OUT_DIR")

    p = sub.add_parser("serve", help="local demo web app: text search, captions, relevance maps",
                       description="Serve CKPT with a page and a JSON API (/api/; interactive docs at /docs, schema "
                                   "at /openapi.json) over the images of --gallery (embedded once, cached).")
    p.add_argument("checkpoint")
    p.add_argument("--gallery", required=True, help="directory of images to search")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--cache", default=None, help="embedding cache dir (default: ~/.cache/finealign/serve)")
    p.add_argument("--max-upload-mb", type=_at_least(0.001, float), default=8.0, help="upload size limit in MiB (default: 8)")

    sub.add_parser("recipes", help="list bundled recipes")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may follow options (`eval CKPT --task retrieval eval.max_images=32`)
    bad = [a for a in rest if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    from .config import ConfigError
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    try:
        return VERBS[args.verb](args)
    except (ConfigError, OSError, ValueError, KeyError, CheckpointError, NonFiniteLossError) as e:
        # OSError: a path that exists where a new one is wanted, a permission, a full disk: one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"finealign {args.verb}: error: {msg}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- verbs

def cmd_data(args) -> int:
    if args.data_verb == "shard":
        return cmd_data_shard(args)
    from .data.sources.emoji import build_emoji_dataset
    stats = build_emoji_dataset(args.out, font=args.font, size=args.size, seed=args.seed)
    print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_data_shard(args) -> int:
    from .config import ConfigError, from_dict, parse_overrides
    from .data.sources.webdataset_source import write_split_shards
    extra = parse_overrides(args.overrides)
    if set(extra) - {"data"}:
        raise ConfigError(f"data shard: only data.* overrides apply, got {', '.join(sorted(set(extra) - {'data'}))}")
    data = {**extra.get("data", {}), "source": args.source}
    if args.root is not None:
        data["root"] = args.root
    res = write_split_shards(from_dict({"data": data}).data, args.split, args.out, args.maxcount, args.image_format,
                             force=args.force)
    print(f"wrote {len(res['shards'])} shard(s), {res['samples']} sample(s) -> {args.out}"
          + (f" (replaced {res['replaced']} earlier shard(s))" if res["replaced"] else ""))
    print(f"skipped {res['skipped']} sample(s)" + "".join(f"\n  {n:6d}  {r}" for r, n in res["skips"].items()))
    first, last = Path(res["shards"][0]), Path(res["shards"][-1])
    span = first.name if first == last else _brace_span(first.name, last.name)
    print(f"read back with: data.source=webdataset data.{args.split if args.split in ('train', 'val', 'test') else 'train'}"
          f"={first.parent / span}")
    return 0


def _brace_span(first: str, last: str) -> str:
    """``train-000000.tar``, ``train-000006.tar`` -> ``train-{000000..000006}.tar`` (braceexpand syntax)."""
    import os.path
    head = os.path.commonprefix([first, last])
    head = head.rstrip("0123456789")
    tail = first[len(head):].lstrip("0123456789")
    return f"{head}{{{first[len(head):len(first) - len(tail)]}..{last[len(head):len(last) - len(tail)]}}}{tail}"


def cmd_train(args) -> int:
    from .config import ConfigError, load_config, merge, parse_overrides, from_dict
    from .train.loop import train
    overrides = list(args.overrides) + (["data.strict=true"] if args.strict else [])
    if args.recipe and "=" in args.recipe and args.resume:
        # `train --resume RUN key=value`: argparse hands the first override to the optional recipe slot
        overrides, args.recipe = [args.recipe] + overrides, None
    run = _resumed_run(args.resume, overrides)
    saved = _run_config(run) if run is not None else None
    if saved is not None:
        # a resume continues the run's own config (data, batch, objectives as trained); overrides apply on top
        if args.recipe and not _same_recipe(args.recipe, saved.get("recipe")):
            raise ConfigError(f"{run} was trained with recipe {saved.get('recipe')!r}, not {args.recipe!r}; "
                              f"`finealign train --resume {run} [key=value ...]` continues it with its own config")
        cfg = from_dict(merge(saved, parse_overrides(overrides)))
    elif args.recipe:
        cfg = load_config(args.recipe, overrides)
    else:
        raise ConfigError("name a recipe (finealign recipes lists them) or --resume RUN_DIR" if not args.resume
                          else f"--resume {args.resume}: {run} holds no config.yaml or checkpoint to continue")
    if run is not None and not any(o.startswith("train.run_dir=") for o in overrides):
        # the run continues where it now is: config.yaml's run_dir is where it was trained, and a moved or
        # copied run would otherwise write (and prune checkpoints) there
        cfg.train.run_dir = str(run)
    from . import distributed as D
    run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)   # torchrun: every rank trains
    if D.is_main():
        print(f"run directory: {run_dir}")
    D.destroy()                  # the trainer's last barrier has already brought the ranks together
    return 0


def _resumed_run(resume: str | None, overrides: list[str]) -> Path | None:
    """The run dir a resume continues: ``--resume RUN|CHECKPOINT``, or ``train.run_dir`` with ``latest``."""
    if not resume:
        return None
    if resume == "latest":
        given = [o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir=")]
        return Path(given[-1]) if given and given[-1] else None
    run = Path(resume)
    return run.parent.parent if run.parent.name == "checkpoints" else run


def _run_config(run: Path) -> dict | None:
    """The run's config.yaml, else its newest checkpoint's config (None: neither)."""
    import yaml
    from .config import ConfigError
    from .train import checkpoint as ckpt
    path = run / "config.yaml"
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a run's config (a mapping), got {type(data).__name__}")
        return data
    try:
        return ckpt.load_config_from_checkpoint(run, verify=False) if ckpt.list_checkpoints(run) else None
    except ckpt.CheckpointError:
        return None


def _same_recipe(given: str, saved: str | None) -> bool:
    if not saved:
        return True
    stem = Path(given).stem if given.endswith(".yaml") else given
    return stem == saved or Path(stem).name == Path(saved).name


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart
    return quickstart(args)


def cmd_viz(args) -> int:
    if args.viz_verb == "study":
        from .analysis.plot_study import save_study_plot
        print(f"wrote {save_study_plot(args.results, args.out, args.x, args.metric)}")
        return 0
    from .api import load
    loaded = load(args.checkpoint)
    if loaded.config.model.arch == "maccap" and args.viz_verb in ("masks", "mix"):
        raise ValueError(f"viz {args.viz_verb}: {loaded.path} is a MacCap run (a captioner trained over a frozen "
                         f"backbone); its patches and text are the backbone's: visualise the backbone run "
                         f"({loaded.config.maccap.backbone or 'maccap.backbone'})")
    if args.viz_verb == "prototypes":
        from .analysis.viz_prototypes import save_prototype_figure
        out = save_prototype_figure(loaded, args.images, args.out, args.num, args.top)
        print(f"wrote {out}")
        return 0
    if args.viz_verb == "mix":
        from .analysis.viz_mix import save_mix_figure
        out = save_mix_figure(loaded, args.out, args.split, args.num, args.mixer, args.seed)
        print(f"wrote {out}")
        return 0
    from .analysis.viz import save_mask_figure
    out = save_mask_figure(loaded, args.image, args.text, args.out)
    print(f"wrote {out}")
    return 0


def cmd_analyze(args) -> int:
    from dataclasses import replace
    from .analysis.gap import format_gap_summary, run_gap_analysis
    from .api import load
    from .config import ConfigError, from_dict, merge, parse_overrides
    loaded = load(args.checkpoint)
    extra = parse_overrides(args.overrides)
    if set(extra) - {"data"}:
        raise ConfigError(f"analyze gap: only data.* overrides apply to a trained model, got "
                          f"{', '.join(sorted(set(extra) - {'data'}))}")
    loaded = replace(loaded, config=from_dict(merge(loaded.config.to_dict(), extra)))
    if loaded.config.model.arch == "maccap":     # its embeddings are the frozen backbone's: measure that
        print(f"{loaded.path} is a MacCap run: the gap of its frozen backbone ({loaded.config.maccap.backbone})")
        loaded = replace(loaded, model=loaded.model.backbone)
    res = run_gap_analysis(loaded, split=args.split, out_dir=args.out, max_images=args.max_images,
                           progress=not args.no_progress, k=args.k, w=args.w)
    print(format_gap_summary(res))
    for f in res["files"]:
        print(f"wrote {f}")
    return 0


def cmd_ablate(args) -> int:
    from .ablate import cmd_ablate as run
    return run(args)


def cmd_report(args) -> int:
    from .report import cmd_report as run
    return run(args)


def cmd_export(args) -> int:
    from .interop.export import export
    out = export(args.checkpoint, args.out_dir, overwrite=args.force)
    print(f"exported to {out}")
    return 0


def cmd_serve(args) -> int:
    from .serve import cmd_serve as run
    return run(args)


def cmd_recipes(args) -> int:
    from .config import CONFIG_DIR, bundled_recipes
    for p in bundled_recipes():
        first = p.read_text().splitlines()[0].lstrip("# ") if p.read_text() else ""
        print(f"{str(p.relative_to(CONFIG_DIR))[:-5]:<32} {first}")
    return 0


from .cli_infer import cmd_caption, cmd_eval, cmd_retrieve  # noqa: E402  (verbs that load a checkpoint)

VERBS = {"data": cmd_data, "train": cmd_train, "eval": cmd_eval, "caption": cmd_caption,
         "retrieve": cmd_retrieve, "quickstart": cmd_quickstart, "ablate": cmd_ablate, "viz": cmd_viz,
         "recipes": cmd_recipes, "analyze": cmd_analyze, "export": cmd_export, "serve": cmd_serve,
         "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
