"""What a report reads: run directories (README "A run directory") and ablation study directories.

A run directory holds ``config.yaml`` and ``metrics.jsonl`` and/or ``checkpoints/``; evaluation results
are the JSON files ``finealign eval`` writes (``<checkpoint>/eval_<split>.json``, or ``--out``), that the
quickstart and the ablation runner write (``RUN_DIR/eval_test.json``) and that ``finealign report --eval``
writes (``RUN_DIR/eval_<split>_report.json``); ``RUN_DIR/gap/gap.json`` is ``finealign analyze gap``'s.
An ablation directory holds ``results.json`` and ``table.md`` (finealign/ablate.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class NotARunDir(ValueError):
    """A path given to ``finealign report`` is neither a run directory nor an ablation directory."""


@dataclass
class Metrics:
    rows: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)      # 1-based line numbers that were skipped

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the rows that have a finite number for it."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
                xs.append(r["step"])
                ys.append(float(v))
        return xs, ys

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update(dict.fromkeys(k for k in r if k != "step"))
        return list(seen)

    def objectives(self) -> list[str]:
        """Objective names with a ``<prefix>/<name>/loss`` scalar, in logging order."""
        names: dict[str, None] = {}
        for k in self.keys():
            parts = k.split("/")
            if len(parts) == 3 and parts[2] == "loss":
                names[parts[1]] = None
        return list(names)


@dataclass
class RunDir:
    path: Path
    name: str
    config: dict
    metrics: Metrics
    evals: list[tuple[Path, dict]]          # (file, results), oldest first
    checkpoint: Path | None                 # the newest checkpoint directory, if any
    gap: dict | None = None


@dataclass
class AblationDir:
    path: Path
    name: str
    results: dict
    table_md: str


def read_metrics(path: Path) -> Metrics:
    """metrics.jsonl -> Metrics; a line that is not a JSON object is skipped and its number recorded."""
    out = Metrics()
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            out.rows.append(row)
        else:
            out.bad_lines.append(n)
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def find_evals(run: Path) -> list[tuple[Path, dict]]:
    """Every eval results JSON of a run directory, oldest first; unreadable files are skipped."""
    files = sorted(run.glob("eval_*.json")) + sorted(run.glob("checkpoints/*/eval_*.json"))
    out = []
    for f in sorted(files, key=lambda p: p.stat().st_mtime):
        try:
            out.append((f, _read_json(f)))
        except ValueError:
            continue
    return out


def latest_checkpoint(run: Path) -> Path | None:
    from ..train.checkpoint import list_checkpoints
    ckpts = list_checkpoints(run) if (run / "checkpoints").is_dir() else []
    return Path(ckpts[-1]) if ckpts else None


def open_input(path: str | Path) -> RunDir | AblationDir:
    """Classify and read one report input; raises :class:`NotARunDir` naming it otherwise."""
    import yaml
    p = Path(path)
    if p.parent.name == "checkpoints" and (p / "model.safetensors").exists():
        p = p.parent.parent                                    # a checkpoint dir: its run
    if not p.is_dir():
        raise NotARunDir(f"{path}: no such directory (expected a run directory from `finealign train` or an "
                         f"ablation directory from `finealign ablate`)")
    if (p / "results.json").exists() and (p / "table.md").exists():
        res = _read_json(p / "results.json")
        if not isinstance(res.get("runs"), list) or not isinstance(res.get("rows"), list):
            raise NotARunDir(f"{p / 'results.json'}: not an ablation results file (no 'runs' / 'rows' lists)")
        return AblationDir(path=p, name=p.name, results=res, table_md=(p / "table.md").read_text())
    has_metrics, has_ckpt = (p / "metrics.jsonl").exists(), (p / "checkpoints").is_dir()
    if not (p / "config.yaml").exists() or not (has_metrics or has_ckpt):
        missing = [n for n, ok in (("config.yaml", (p / "config.yaml").exists()),
                                   ("metrics.jsonl or checkpoints/", has_metrics or has_ckpt)) if not ok]
        raise NotARunDir(f"{path} is not a run directory: it has no {' and no '.join(missing)} (expected the "
                         f"output of `finealign train`, or an ablation directory with results.json and table.md)")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise NotARunDir(f"{p / 'config.yaml'}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise NotARunDir(f"{p / 'config.yaml'}: expected a mapping, got {type(config).__name__}")
    gap = None
    if (p / "gap" / "gap.json").exists():
        try:
            gap = _read_json(p / "gap" / "gap.json")
        except ValueError:
            gap = None
    return RunDir(path=p, name=p.name, config=config, metrics=read_metrics(p / "metrics.jsonl"),
                  evals=find_evals(p), checkpoint=latest_checkpoint(p), gap=gap)


def unique_names(items: list) -> None:
    """Disambiguate equal ``name``s (``seed0`` of two recipes) with their parent directory's name."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.name] = counts.get(it.name, 0) + 1
    for it in items:
        if counts[it.name] > 1:
            it.name = f"{it.path.parent.name}/{it.path.name}"
    seen: dict[str, int] = {}
    for it in items:                     # parents named alike too: number them
        seen[it.name] = seen.get(it.name, 0) + 1
        if seen[it.name] > 1:
            it.name = f"{it.name} ({seen[it.name]})"
