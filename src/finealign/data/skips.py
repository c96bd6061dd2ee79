"""Bad input is skipped and counted per reason (with example keys), or raised under ``strict``.

Inputs that were fixed rather than dropped (a caption cut to length, control characters removed)
are counted separately with ``note`` (never raised, also under ``strict``): ``notes`` /
``note_samples``, in ``summary()`` and in ``to_dict()["fixed"]``."""
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
        self.notes: Counter[str] = Counter()
        self.note_samples: dict[str, list[str]] = {}

    def note(self, what: str, where: str) -> None:
        """Record one input that was fixed and kept (not a skip; never raises)."""
        self.notes[what] += 1
        ex = self.note_samples.setdefault(what, [])
        if len(ex) < self.examples:
            ex.append(where)

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
            for r, n in other.notes.items():
                self.notes[r] += n
                ex = self.note_samples.setdefault(r, [])
                ex.extend(w for w in other.note_samples.get(r, []) if len(ex) < self.examples)
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

    def reasons(self) -> str:
        """One line: ``"3 missing file, 1 corrupt image"`` ("" when nothing was skipped)."""
        return ", ".join(f"{n} {r}" for r, n in self.counts.most_common())

    def summary(self) -> str:
        lines = [f"skipped {self.total} sample(s):"] if self.counts else ["no samples skipped"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n:6d}  {reason}  e.g. {', '.join(self.samples.get(reason, []))}")
        if self.notes:
            lines.append(f"fixed {sum(self.notes.values())} input(s) (kept):")
        for what, n in self.notes.most_common():
            lines.append(f"  {n:6d}  {what}  e.g. {', '.join(self.note_samples.get(what, []))}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"total": self.total, "counts": dict(self.counts), "examples": self.samples}
        if self.notes:
            out["fixed"] = {"counts": dict(self.notes), "examples": self.note_samples}
        return out
