"""Run metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("finealign")


class MetricLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        """``resume_step``: the run resumes from a checkpoint at that step; rows the interrupted process
        logged after it (and a line torn by a kill) are dropped, so each step appears once. Without it the
        run starts afresh: rows of an earlier attempt that saved no checkpoint are dropped."""
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            _truncate_after(self.path, resume_step)
        self._fh = open(self.path, "a" if resume_step is not None else "w", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # tensorboard missing or broken: JSONL still works
                log.warning("TensorBoard logging disabled: %s", e)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        row = {"step": step, **{f"{prefix}/{k}": _num(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        pass

    def close(self) -> None:
        pass


def _truncate_after(path: Path, step: int) -> None:
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = row["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        log.info("%s: dropped %d row(s) logged after the resumed step %d", path, dropped, step)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        tmp.replace(path)


def _num(v):
    return float(v) if isinstance(v, (int, float)) else v


def read_metrics(run_dir: Path | str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
