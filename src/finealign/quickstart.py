"""``finealign quickstart``: emoji data -> CoCa (tiny) for ~5 CPU minutes -> retrieval + captioning table."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("finealign")


def quickstart(args) -> int:
    from .config import load_config
    from .eval.runner import evaluate, format_results
    from .train.loop import Trainer

    overrides = [f"data.root={args.data}"]
    data_dir = Path(args.data)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"--data {data_dir} is a file: give the emoji dataset's directory (built there if missing)")
    if not (data_dir / "test.jsonl").exists():
        from .data.sources.emoji import build_emoji_dataset
        try:
            print(f"building the emoji dataset in {data_dir} ...")
            build_emoji_dataset(data_dir, progress=not args.no_progress)
        except FileNotFoundError as e:
            print(f"emoji font not available ({e}).\nFalling back to the procedural 'shapes' dataset "
                  f"(install fonts-noto-color-emoji for the emoji data).")
            overrides = ["data.source=shapes"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.out:
        overrides.append(f"train.run_dir={args.out}")
    cfg = load_config("quickstart", overrides + list(args.overrides))
    print(f"training CoCa ({cfg.model.preset}) on {cfg.data.source} for {cfg.train.steps} steps ...")
    t0 = time.time()
    trainer = Trainer(cfg, progress=not args.no_progress)
    run_dir = trainer.train()
    minutes = (time.time() - t0) / 60
    print(f"trained in {minutes:.1f} min; evaluating on the {cfg.data.test} split ...")
    res = evaluate(trainer.model, trainer.tokenizer, cfg, split=cfg.data.test, device=trainer.device,
                   progress=not args.no_progress)
    (Path(run_dir) / "eval_test.json").write_text(json.dumps(res, indent=2, default=str))
    n = res["num_images"]
    print()
    print(f"== results on {n} test images ({cfg.data.source}) ==")
    print(format_results(res))
    print(f"  chance: R@1 = {100 / n:.2f}, R@5 = {500 / n:.2f}, R@10 = {1000 / n:.2f}")
    if res.get("samples"):
        print("\n== sample captions (generated | reference) ==")
        for s in res["samples"][:8]:
            print(f"  {s['generated']!r:<45} | {s['references'][0]!r}")
    print(f"\nrun directory: {run_dir}  (checkpoints, metrics.jsonl, tb/, eval_test.json)")
    print(f"next: finealign eval {run_dir} --task retrieval   |   finealign caption {run_dir} IMAGE.png")
    return 0
