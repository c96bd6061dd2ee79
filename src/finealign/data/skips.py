"""Bad input is skipped and counted per reason (with example keys), or raised under ``strict``."""
from __future__ import annotations

from collections import Counter


class BadSampleError(ValueError):
    """Raised for a bad sample when ``data.strict`` is on. The message names file and line/key."""


class SkipLog:
    def __init__(self, strict: bool = False, examples: int = 3):
        self.strict = strict
        self.examples = examples
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str) -> None:
        """Record one skipped sample. ``where`` is 'file:line', a path or a shard member."""
        if self.strict:
            raise BadSampleError(f"{where}: {reason}")
        self.counts[reason] += 1
        ex = self.samples.setdefault(reason, [])
        if len(ex) < self.examples:
            ex.append(where)

    def update(self, other: "SkipLog | list[tuple[str, str]]") -> None:
        pairs = other if isinstance(other, list) else [
            (r, w) for r, ws in other.samples.items() for w in ws]
        if isinstance(other, SkipLog):  # counts may exceed kept examples
            for r, n in other.counts.items():
                self.counts[r] += n
                ex = self.samples.setdefault(r, [])
                ex.extend(w for w in other.samples.get(r, []) if len(ex) < self.examples)
            return
        for r, w in pairs:
            self.counts[r] += 1
            ex = self.samples.setdefault(r, [])
            if len(ex) < self.examples:
                ex.append(w)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        lines = [f"skipped {self.total} sample(s):"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n:6d}  {reason}  e.g. {', '.join(self.samples.get(reason, []))}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.samples}
