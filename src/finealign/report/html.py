"""One self-contained HTML file: inline CSS, every image a base64 ``data:image/png`` URI, no scripts."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.5em} h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em}
h3{font-size:1.05em;margin-bottom:.3em} .muted{color:#666;font-size:.9em}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .7em;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em;background:#fff}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.4em 0;image-rendering:auto}
.runs{display:grid;gap:1.2em;align-items:start;overflow-x:auto} .run{min-width:0;background:#fff;padding:.2em .8em;border:1px solid #ddd}
.wide{overflow-x:auto;max-width:100%} .captions{display:flex;flex-wrap:wrap;gap:.8em} figure{margin:0;width:150px;font-size:.8em}
figure img{width:128px;image-rendering:pixelated} .gen{color:#0a5} .ref{color:#555}
"""


@dataclass
class Section:
    title: str
    parts: list = field(default_factory=list)     # str (HTML, already escaped) or Image

    def text(self, s: str, cls: str = "") -> "Section":
        self.parts.append(f'<p{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{esc(s)}</p>')
        return self

    def note(self, s: str) -> "Section":
        return self.text(s, "note")

    def html(self, s: str) -> "Section":
        self.parts.append(s)
        return self

    def image(self, path: Path, alt: str) -> "Section":
        self.parts.append(Image(Path(path), alt))
        return self


@dataclass
class Image:
    path: Path
    alt: str


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):           # 2 decimals for metrics in percent, 4 significant digits below 1
        if not math.isfinite(v):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table; numbers are right-aligned and formatted with :func:`fmt`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}><thead><tr>{head}</tr></thead>' \
           f"<tbody>{body}</tbody></table>"


def markdown_table(md: str, cls: str = "") -> tuple[str, list[str]]:
    """A pipe table (as ``format_table`` writes it) -> (HTML table, the other non-empty lines)."""
    rows, rest = [], []
    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s[1:-1].split("|")]
            if not all(set(c) <= set(":-") and c for c in cells):       # not the |---|---:| rule
                rows.append(cells)
        elif s:
            rest.append(s)
    if not rows:
        return "", rest
    return table(rows[0], rows[1:], cls), rest


def part(p) -> str:
    if isinstance(p, Image):
        return f'<img src="{data_uri(p.path)}" alt="{esc(p.alt)}" data-file="{esc(p.path.name)}">'
    return p


def slug(text: str) -> str:
    """"Retrieval: text → top-5" -> "retrieval-text-top-5"."""
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def _section(s: Section, level: int, prefix: str = "") -> str:
    """``<section id=PREFIX-SLUG data-section=SLUG>``: ids stay unique when runs repeat a section."""
    sid = slug(s.title)
    return (f'<section id="{esc(prefix + sid)}" data-section="{esc(sid)}"><h{level}>{esc(s.title)}</h{level}>'
            + "".join(map(part, s.parts)) + "</section>")


def render(title: str, meta: str, top: list[Section], columns: list[tuple[str, list[Section]]]) -> str:
    """``top`` sections across the page, then one column per entry of ``columns`` (side by side)."""
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
           f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"muted\">{esc(meta)}</p>"]
    out += [_section(s, 2) for s in top]
    if columns:
        out.append(f'<div class="runs" style="grid-template-columns:repeat({len(columns)},minmax(420px,1fr))">')
        for k, (name, sections) in enumerate(columns):
            out.append(f'<div class="run" data-run="{esc(name)}"><h2>{esc(name)}</h2>')
            out += [_section(s, 3, f"{slug(name)}-{k}-") for s in sections]
            out.append("</div>")
        out.append("</div>")
    out.append("</body></html>\n")
    return "".join(out)
