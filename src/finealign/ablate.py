"""Ablation studies: train and evaluate a set of recipes over several seeds, then tabulate mean ± std.

``finealign ablate PATH`` where PATH is a directory of recipe YAMLs (sorted by file name; files starting
with ``_`` or ``.`` are skipped so a shared ``_base.yaml`` can live beside them) or a YAML file with
``recipes: [paths or bundled names...]`` (paths relative to that file). A recipe's first line, if it is a
comment, is its description.

What a seed changes: every run of recipe R with seed k is ``load_config(R, overrides + ["train.seed=k",
"train.run_dir=OUT/R/seedk"])``. ``train.seed`` seeds Python/NumPy/torch before the model is built, so it
changes the model initialisation and any random draw an objective makes (masks, mixing). ``data.seed`` is
left alone: the procedural data, the ``data.fraction`` subset, the shuffle order and the augmentation
draws stay identical across seeds and recipes (pass ``data.seed=...`` as an override to change them for
the whole study). Every recipe must train with equal ``train.steps``, ``data.batch_size``,
``train.grad_accum`` and the same data (source, root, splits, fraction, num_samples, seed) — otherwise
:func:`run_ablation` raises ``ValueError`` naming the recipe and the key before anything trains.

Each run directory gets the usual training outputs plus ``eval_test.json`` (``evaluate`` on
``data.test`` with the recipe's ``eval.tasks`` or the ``tasks`` argument, plus a ``timing`` entry). It is
written last and atomically: with ``resume=True`` a run that has it is not retrained, and a run that
stopped mid-training continues from its latest checkpoint, so re-running the same command (same
``--out``) finishes an interrupted study. The study directory gets ``results.json`` (every run's
metrics, config summary, wall time; the rows; the command) and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from .ablate_table import METRICS, MISSING, footer as _footer, format_cell, format_table, summarize
from .config_checks import get_key as _get
from .config_schema import EVAL_TASKS

log = logging.getLogger("finealign")

__all__ = ["discover_recipes", "recipe_description", "run_ablation", "summarize", "format_table", "format_cell",
           "default_out_dir", "add_ablate_parser", "cmd_ablate", "AblationInterrupted", "METRICS",
           "SAME_KEYS"]

# config keys every recipe of a study must share: equal steps and data is the point of an ablation
SAME_KEYS = ["train.steps", "data.batch_size", "train.grad_accum", "data.source", "data.root",
             "data.train", "data.val", "data.test", "data.fraction", "data.num_samples", "data.seed"]
RESULT_FILE = "eval_test.json"


class AblationInterrupted(RuntimeError):
    """Training stopped early (SIGINT/SIGTERM): the checkpoint is saved; re-run the same command to resume."""


# ---------------------------------------------------------------- recipes

def discover_recipes(path: str | os.PathLike) -> list[Path]:
    """The recipe files of a study: a directory's ``*.yaml``/``*.yml`` sorted by name, or a list file's.
    A path that does not exist is looked up among the bundled recipes too (``ablations/sycoca``)."""
    from .config import find_recipe
    p = _study_path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".yaml", ".yml")
                       and not f.name.startswith(("_", ".")))
        if not found:
            raise ValueError(f"{p}: no recipe YAMLs in this directory")
    elif p.is_file():
        data = yaml.safe_load(p.read_text()) or {}
        entries = data.get("recipes") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{p}: an ablation file must list its recipes as 'recipes: [path, ...]'")
        found = [find_recipe(str(e), relative_to=p.parent) for e in entries]
    else:
        raise FileNotFoundError(f"{p}: no such ablation directory or recipe list")
    names = [f.stem for f in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{p}: recipe names must be unique (they name the run directories): {dupes}")
    return found


def _study_path(path: str | os.PathLike) -> Path:
    """``path``, or the bundled study of that name (``ablations/timix``) when no such path exists here."""
    from .config import CONFIG_DIR
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (CONFIG_DIR / p).exists():
        return CONFIG_DIR / p
    return p


def recipe_description(path: str | os.PathLike) -> str:
    """The recipe file's first line when it is a comment (``# SyCoCa without ...``), else ""."""
    lines = Path(path).read_text().splitlines()
    return lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""


def study_vary(path: str | os.PathLike) -> list[str]:
    """Keys a study lets differ between its recipes: ``vary: [data.fraction]`` in the directory's
    ``_study.yaml`` or beside ``recipes:`` in a list file (e.g. a data-efficiency study); they become
    table columns. Only ``SAME_KEYS`` may be listed (anything else may differ anyway)."""
    p = _study_path(path)
    f = p / "_study.yaml" if p.is_dir() else p
    if not f.is_file():
        return []
    data = yaml.safe_load(f.read_text()) or {}
    vary = data.get("vary", []) if isinstance(data, dict) else None
    if not isinstance(vary, list) or any(k not in SAME_KEYS for k in vary):
        raise ValueError(f"{f}: 'vary' must list keys among {SAME_KEYS}, got {vary!r}")
    return [str(k) for k in vary]


def _check_same(configs: dict[str, Any], vary: Sequence[str] = ()) -> None:
    """ValueError naming the first recipe and key that differ from the first recipe's."""
    (first, ref), *others = configs.items()
    for name, cfg in others:
        for key in SAME_KEYS:
            if key in vary:
                continue
            a, b = _get(ref, key), _get(cfg, key)
            if a != b:
                raise ValueError(f"recipe {name!r} has {key}={b!r} but {first!r} has {key}={a!r}: every "
                                 f"recipe of an ablation must train with equal steps and data")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_mismatch(run_dir: Path, cfg) -> str | None:
    """The first key where the run dir's saved config.yaml differs from ``cfg`` (None: same or absent).
    A key the saved config lacks (added to finealign after that run) is no difference while ``cfg`` holds
    its default: the run was trained with that default's behaviour."""
    from .config import Config
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return None
    saved, now = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(cfg.to_dict())
    defaults = _flat(Config().to_dict())
    for k in sorted(set(saved) | set(now)):
        if k not in saved and k in defaults and now.get(k, MISSING) == defaults[k]:
            continue
        if k == "train.run_dir":     # where the run lies, not what it ran (--out spelled another way, moved)
            continue
        if saved.get(k, MISSING) != now.get(k, MISSING):
            return f"{k}: saved {saved.get(k, MISSING)!r}, now {now.get(k, MISSING)!r}"
    return None


def _check_same_study(out: Path, path) -> None:
    """An --out that holds another study's results.json is refused (its table would be replaced, its runs
    left without one)."""
    try:
        before = json.loads((out / "results.json").read_text()).get("path")
    except (OSError, ValueError, AttributeError):
        return
    if before and Path(before).resolve() != Path(path).resolve():
        raise ValueError(f"{out} holds the results of another study ({before}); give this one another --out")


def _check_tasks(name: str, cfg, tasks) -> None:
    """``--task caption`` needs a caption decoder (CoCa-arch with decoder layers, or MacCap); ``vqa`` MacCap."""
    arch = cfg.model.arch
    if tasks and "caption" in tasks and not (arch == "maccap" or (arch == "coca" and cfg.model.decoder_layers > 0)):
        raise ValueError(f"--task caption: recipe {name} has no caption decoder (model.arch={arch}, "
                         f"decoder_layers={cfg.model.decoder_layers}); drop the task or the recipe")
    if tasks and "vqa" in tasks and arch != "maccap":
        raise ValueError(f"--task vqa: recipe {name} cannot answer questions (zero-shot VQA needs a MacCap recipe)")


def _resolved(cfg):
    """The config as the trainer saves it (MacCap runs copy their backbone's model section in)."""
    if cfg.maccap.backbone:
        from .zeroshot.maccap import resolve_backbone
        return resolve_backbone(cfg)[0]
    return cfg


def _config_summary(cfg) -> dict[str, Any]:
    return {"recipe": cfg.recipe, "model.preset": cfg.model.preset, "objectives": cfg.active_objectives(),
            "eval.tasks": list(cfg.eval.tasks), **{k: _get(cfg, k) for k in SAME_KEYS},
            "train.lr": cfg.train.lr, "train.seed": cfg.train.seed, "train.run_dir": cfg.train.run_dir}


def default_out_dir(path: str | os.PathLike) -> Path:
    """``runs/ablations/<dir or list-file name>-<timestamp>``."""
    p = Path(path)
    name = (p.name if p.is_dir() else p.stem) or "ablation"
    return Path("runs") / "ablations" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- running

def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _train_and_eval(cfg, run_dir: Path, tasks, progress: bool, resume: bool) -> dict:
    """Train (continuing from a checkpoint when resuming) and evaluate on the test split."""
    from .eval.runner import evaluate
    from .train.checkpoint import list_checkpoints
    from .train.loop import Trainer
    t0 = time.perf_counter()
    continue_from = "latest" if resume and list_checkpoints(run_dir) else None
    if continue_from is None and run_dir.exists():
        log.info("removing the stale run directory %s (starting this run from scratch)", run_dir)
        shutil.rmtree(run_dir)
    trainer = Trainer(cfg, resume=continue_from, progress=progress)
    trainer.train()
    if trainer.step < cfg.train.steps:
        raise AblationInterrupted(f"{run_dir}: training stopped at step {trainer.step}/{cfg.train.steps}; "
                                  f"run the same command again to continue")
    t1 = time.perf_counter()
    res = evaluate(trainer.model, trainer.tokenizer, cfg, split=cfg.data.test,
                   tasks=list(tasks or cfg.eval.tasks), device=trainer.device, progress=progress)
    t2 = time.perf_counter()
    res["timing"] = {"train_s": t1 - t0, "eval_s": t2 - t1, "wall_s": t2 - t0,
                     "resumed_from_checkpoint": continue_from is not None}
    res["tasks_asked"] = list(tasks or cfg.eval.tasks)
    _write_json_atomic(run_dir / RESULT_FILE, res)
    return res


def _headline(res: dict) -> str:
    parts = [f"{head} {res[task][key]:.1f}" for task, key, head in METRICS
             if isinstance(res.get(task, {}).get(key), (int, float))]
    return ", ".join(parts)


def run_ablation(path: str | os.PathLike, seeds: int | Sequence[int] = 3, overrides: Sequence[str] = (),
                 out_dir: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
                 progress: bool = True, resume: bool = True, command: str | None = None) -> dict:
    """Train and evaluate every recipe of ``path`` with every seed; write ``results.json`` and ``table.md``.

    ``seeds``: a count N (seeds 0..N-1) or an explicit list. ``overrides``: dotted ``key=value`` applied to
    every recipe. ``tasks``: eval tasks for every recipe (default: each recipe's ``eval.tasks``).
    ``command``: the command line, recorded in the outputs. Returns
    ``{"rows": summarize(...), "runs": [...], "table": str, "out_dir": Path}``.
    """
    from .config import load_config
    from .train.checkpoint import list_checkpoints
    own = [o for o in overrides if o.split("=", 1)[0].strip() in ("train.seed", "train.run_dir")]
    if own:
        raise ValueError(f"ablate sets train.seed (from --seeds) and train.run_dir (under --out) itself; "
                         f"drop {', '.join(own)}")
    recipes = discover_recipes(path)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be a positive count or a list of distinct seeds, got {seeds!r}")
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: an ablation writes a directory (its runs, table.md, results.json)")
    _check_same_study(out, path)
    configs = {}      # (name, seed) -> Config; all built (and checked) before anything trains
    for rec in recipes:
        for seed in seed_list:
            configs[rec.stem, seed] = load_config(str(rec), list(overrides) + [
                f"train.seed={seed}", f"train.run_dir={out / rec.stem / f'seed{seed}'}"])
    vary = study_vary(path)
    _check_same({rec.stem: configs[rec.stem, seed_list[0]] for rec in recipes}, vary)
    for rec in recipes:                  # an asked task a recipe cannot run: refused before hours of training
        _check_tasks(rec.stem, configs[rec.stem, seed_list[0]], tasks)
    out.mkdir(parents=True, exist_ok=True)

    runs, total = [], len(configs)
    for i, ((name, seed), cfg) in enumerate(configs.items(), 1):
        run_dir = Path(cfg.train.run_dir)
        tag = f"[{i}/{total}] {name} seed {seed}"
        result_path = run_dir / RESULT_FILE
        if resume and (result_path.exists() or list_checkpoints(run_dir)):   # something to reuse
            bad = _config_mismatch(run_dir, _resolved(cfg))
            if bad:
                raise ValueError(f"{run_dir} was run with a different config ({bad}); use --no-resume to "
                                 f"retrain it or another --out")
        done = json.loads(result_path.read_text()) if resume and result_path.exists() else None
        if done is not None:             # reused only if it holds every task asked now
            have = done.get("tasks_asked") or [t for t in EVAL_TASKS if t in done]
            lacking = sorted(set(tasks or cfg.eval.tasks) - set(have))
            if lacking:
                log.info("%s: trained, but %s lacks task(s) %s: evaluating again from the final checkpoint",
                         tag, result_path, ", ".join(lacking))
                done = None
        if done is not None:
            res = done
            reused = True
            log.info("%s: already done (%s), not retrained", tag, result_path)
        else:
            log.info("%s: training ...", tag)
            res = _train_and_eval(cfg, run_dir, tasks, progress, resume)
            reused = False
            log.info("%s: done in %.1f s (%s)", tag, res["timing"]["wall_s"], _headline(res))
        runs.append({"recipe": name, "seed": seed, "run_dir": str(run_dir), "reused": reused,
                     "wall_s": res.get("timing", {}).get("wall_s"), "config": _config_summary(cfg),
                     "results": {k: v for k, v in res.items() if k != "samples"}})

    descriptions = {rec.stem: recipe_description(rec) for rec in recipes}
    rows = summarize(runs)
    for row in rows:
        row["description"] = descriptions.get(row["recipe"], "")
        row["varied"] = {k: _get(configs[row["recipe"], seed_list[0]], k) for k in vary}
    ref = configs[recipes[0].stem, seed_list[0]]
    common = {k: ("varies" if k in vary else _get(ref, k)) for k in SAME_KEYS}
    table = format_table(rows) + "\n\n" + _footer(seed_list, common, command) + "\n"
    (out / "table.md").write_text(table)
    _write_json_atomic(out / "results.json", {
        "path": str(path), "command": command, "seeds": seed_list, "overrides": list(overrides),
        "tasks": list(tasks) if tasks else None, "common": common,
        "recipes": [{"name": r.stem, "path": str(r), "description": descriptions[r.stem]} for r in recipes],
        "rows": rows, "runs": runs})
    return {"rows": rows, "runs": runs, "table": table, "out_dir": out}


# ---------------------------------------------------------------- command line

def add_ablate_parser(subparsers) -> argparse.ArgumentParser:
    """``finealign ablate PATH [--seeds N | --seed-list 0,5,7] [--out DIR] [--task T] ... [k=v ...]``."""
    p = subparsers.add_parser(
        "ablate", help="train + evaluate a set of recipes over seeds, tabulate mean ± std",
        description="Train and evaluate every recipe of PATH (a directory of recipe YAMLs or a YAML "
                    "listing 'recipes:') with each seed at equal steps and data; write OUT/table.md "
                    "and OUT/results.json. Re-running with the same --out resumes an interrupted study.")
    p.add_argument("path", help="directory of recipe YAMLs, or a YAML file with 'recipes: [...]'")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=int, default=3, help="number of seeds: 0..N-1 (default 3)")
    g.add_argument("--seed-list", default=None, help="explicit comma-separated seeds, e.g. 0,5,7")
    p.add_argument("--out", default=None, help="study directory (default: runs/ablations/<name>-<time>)")
    p.add_argument("--task", action="append", choices=["retrieval", "caption", "classify", "tgir", "vqa"],
                   help="eval task(s) for every recipe (repeatable; default: each recipe's eval.tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-resume", action="store_true", help="retrain runs that already have results")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted config overrides applied to every recipe, e.g. train.steps=500")
    return p


def cmd_ablate(args) -> int:
    """Run the study, print the table and where it was written."""
    if args.seed_list is not None:
        try:
            seeds: int | list[int] = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seed-list must be comma-separated integers, got {args.seed_list!r}") from None
    else:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        seeds = args.seeds
    out = Path(args.out) if args.out else default_out_dir(args.path)
    # the command as it reproduces (and, rerun, resumes) this study: always with the resolved --out
    argv = ["finealign", "ablate", str(args.path)]
    argv += ["--seed-list", args.seed_list] if args.seed_list is not None else ["--seeds", str(args.seeds)]
    argv += ["--out", str(out)] + [a for t in (args.task or []) for a in ("--task", t)]
    argv += (["--no-progress"] if args.no_progress else []) + (["--no-resume"] if args.no_resume else [])
    argv += list(args.overrides)
    try:
        res = run_ablation(args.path, seeds=seeds, overrides=args.overrides, out_dir=out, tasks=args.task,
                           progress=not args.no_progress, resume=not args.no_resume,
                           command=shlex.join(argv))
    except AblationInterrupted as e:
        print(f"finealign ablate: interrupted: {e}")
        return 130
    print(res["table"])
    print(f"table written to {res['out_dir'] / 'table.md'}, all runs in {res['out_dir'] / 'results.json'}")
    return 0
