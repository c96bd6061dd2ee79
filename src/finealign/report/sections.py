"""The sections of a report: one run's curves, evaluations, model views and analyses; run comparisons;
an ablation study. Each function returns :class:`~.html.Section` objects and writes its PNGs to ``out_dir``."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from . import model_views as mv
from . import plots
from .html import Image, Section, part, esc, markdown_table, table
from .inputs import AblationDir, RunDir

log = logging.getLogger("finealign")
GAP_KEYS = ["n_pairs", "embed_dim", "centred_var", "uncentred_var", "suggested_noise_var", "mean_shift_sq",
            "gap_norm", "pair_cos_mean", "nonpair_cos_mean", "skewness", "excess_kurtosis"]
#: entries of an eval results file that are not a task's metrics
NOT_TASKS = ("skipped", "timing", "evaluated_on")


def _stem(run: RunDir | AblationDir) -> str:
    """The input's display name (``seed0``, ``runs/ab1``, ``ab1 (2)``) as one file-name component."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in run.name)


def curves_section(run: RunDir, out_dir: Path) -> Section:
    sec = Section("Training curves")
    m = run.metrics
    if m.bad_lines:
        sec.note(f"{run.path / 'metrics.jsonl'}: {len(m.bad_lines)} unreadable line(s) skipped "
                 f"(line {', '.join(map(str, m.bad_lines[:10]))}{' ...' if len(m.bad_lines) > 10 else ''})")
    if not m.rows:
        return sec.note(f"no metrics logged: {run.path / 'metrics.jsonl'} is missing or empty")
    last = m.rows[-1].get("step", "?")
    objs = m.objectives()
    sec.text(f"{len(m.rows)} logged steps (last: {last}); objectives: {', '.join(objs) or 'none logged'}",
             "muted objectives")
    for png, caption in plots.training_curves(m, out_dir, _stem(run)):
        sec.image(png, caption)
    return sec


def _scalars(d: dict) -> list[list]:
    return [[k, v] for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def eval_section(run: RunDir) -> Section:
    sec = Section("Evaluation")
    if not run.evals:
        return sec.note(f"no evaluation results in {run.path} (no eval_*.json beside the run or its checkpoints): "
                        f"run `finealign eval {run.path}` or `finealign report --eval`")
    for path, res in run.evals:
        rel = path.relative_to(run.path) if path.is_relative_to(run.path) else path
        sec.html(f"<h4>{esc(rel)}</h4>")
        for task, vals in res.items():
            if isinstance(vals, dict) and task not in NOT_TASKS and _scalars(vals):
                sec.html(table([task, "value"], _scalars(vals), cls=f"eval eval-{task}"))
        for note in [n for v in res.values() if isinstance(v, dict) for n in v.get("notes", [])]:
            sec.text(f"note: {note}", "muted")
        if res.get("samples"):
            sec.html(table(["image", "reference", "generated"],
                           [[s.get("key", ""), " / ".join(s.get("references", [])[:2]), s.get("generated", "")]
                            for s in res["samples"][:8]], cls="eval-samples"))
    return sec


def model_sections(run: RunDir, out_dir: Path, split: str | None, num: int, progress: bool = True
                   ) -> list[Section]:
    """Retrieval grid, caption samples, mask overlays and mixed samples from the latest checkpoint."""
    from ..api import load
    from ..train.checkpoint import CheckpointError
    if run.checkpoint is None:
        return [Section("Model").note(f"no checkpoint in {run.path / 'checkpoints'}: retrieval, captions, masks "
                                      f"and mixing need a trained model; only the curves are shown")]
    try:
        loaded = load(run.path)
    except (CheckpointError, ValueError, OSError, KeyError) as e:
        log.warning("report: %s: cannot load the latest checkpoint: %s", run.path, e)
        return [Section("Model").note(f"cannot load a checkpoint of {run.path}: {e}")]
    cfg, stem = loaded.config, _stem(run)
    split = split or cfg.data.test
    steps = ["retrieval"] + (["captions"] if getattr(loaded.model, "decoder", None) is not None else [])
    steps += ["masks"] if (cfg.masking.ic or cfg.masking.mim or cfg.masking.sync) else []
    steps += ["mixing"] if cfg.mixer.type else []
    out: list[Section] = []
    try:
        gallery = mv.load_gallery(cfg, split, max(16, 4 * num))
    except (ValueError, OSError, KeyError) as e:
        return [Section("Model").note(f"cannot read split {split!r} of {run.path}'s data: {e}")]
    for step in tqdm(steps, desc=f"report {run.name}", disable=not progress, leave=False):
        try:
            out.append(VIEWS[step](loaded, gallery, out_dir, stem, split, num))
        except (RuntimeError, ValueError, KeyError, IndexError) as e:     # one view failing keeps the page
            log.warning("report: %s: the %s view failed: %s: %s", run.path, step, type(e).__name__, e)
            out.append(Section(TITLES[step]).note(f"could not draw the {step} view of {run.path}: "
                                                  f"{type(e).__name__}: {e}"))
    return out


def _retrieval(loaded, gallery, out_dir, stem, split, num) -> Section:
    sec = Section("Retrieval: text → top-5 images")
    img = mv.embed_gallery(loaded, gallery)
    rows = mv.retrieval_rows(loaded, gallery, img, num)
    png = mv.draw_retrieval_grid(gallery, rows, out_dir / f"{stem}_retrieval.png")
    sec.text(f"{len(rows)} queries (a caption of a gallery image) over {len(gallery.samples)} images of split "
             f"{split!r}, ranked by ITC similarity; green outline: an image the query describes; red (6th tile): "
             f"the best-ranked such image when none is in the top 5."
             + (f" {gallery.skipped} unreadable image(s) skipped." if gallery.skipped else ""), "muted")
    sec.image(png, "retrieval grid: each row a text query and its top-5 images, the correct one outlined")
    body = "".join(f'<tr data-rank="{r["rank"]}"><td class="num">{i + 1}</td><td>{esc(r["query"])}</td>'
                   f'<td class="num">{r["rank"]}</td><td>{"yes" if r["rank"] <= mv.TOP else "no"}</td></tr>'
                   for i, r in enumerate(rows))
    hits = sum(r["rank"] <= mv.TOP for r in rows)
    sec.html('<table class="retrieval"><thead><tr><th>row</th><th>query</th><th>rank of the correct image</th>'
             f"<th>in top 5</th></tr></thead><tbody>{body}</tbody></table>")
    return sec.text(f"{hits}/{len(rows)} queries have a correct image in their top 5.", "muted")


def _captions(loaded, gallery, out_dir, stem, split, num) -> Section:
    sec = Section("Caption samples")
    sec.text(f"decoded with eval.decode={loaded.config.eval.decode}; reference captions below in grey", "muted")
    figs = []
    for s in mv.caption_samples(loaded, gallery, num, out_dir, stem):
        refs = "".join(f'<div class="ref">ref: {esc(r)}</div>' for r in s["references"][:3])
        figs.append(f'<figure data-key="{esc(s["key"])}">{part(Image(s["image"], "image " + s["key"]))}'
                    f'<figcaption><div class="gen">generated: {esc(s["generated"])}</div>{refs}</figcaption></figure>')
    return sec.html(f'<div class="captions">{"".join(figs)}</div>')


def _masks(loaded, gallery, out_dir, stem, split, num) -> Section:
    from ..analysis.viz import save_mask_figure
    m = loaded.config.masking
    sec = Section("Mask overlays")
    specs = [("IC (attentive) keeps", m.ic), ("TG-MIM (text-guided) masks", m.mim), ("synchronized", m.sync)]
    sec.text("maskers: " + "; ".join(f"{n}: {s}" for n, s in specs if s), "muted")
    with tempfile.TemporaryDirectory() as tmp:
        for k, i in enumerate(mv.pick_queries(gallery, min(num, 3))):
            src = Path(tmp) / f"{k}.png"
            gallery.images[i].save(src)
            text = gallery.samples[i].captions[0]
            sec.image(save_mask_figure(loaded, src, text, out_dir / f"{stem}_masks_{k}.png"), f"masks for {text!r}")
    return sec


def _mixing(loaded, gallery, out_dir, stem, split, num) -> Section:
    from ..analysis.viz_mix import save_mix_figure
    sec = Section(f"Mixed samples ({loaded.config.mixer.type})")
    png = save_mix_figure(loaded, out_dir / f"{stem}_mix.png", split=split, num=max(2, min(num, 4)))
    return sec.image(png, f"{loaded.config.mixer.type} mixed samples of split {split}")


VIEWS = {"retrieval": _retrieval, "captions": _captions, "masks": _masks, "mixing": _mixing}
TITLES = {"retrieval": "Retrieval: text → top-5 images", "captions": "Caption samples", "masks": "Mask overlays",
          "mixing": "Mixed samples"}


def gap_section(run: RunDir, out_dir: Path) -> Section | None:
    if run.gap is None:
        return None
    sec = Section("Modality gap")
    sec.html(table(["statistic", "value"], [[k, run.gap[k]] for k in GAP_KEYS if k in run.gap], cls="gap"))
    for name in ("gap_hist.png", "gap_qq.png", "gap_subregions.png"):
        src = run.path / "gap" / name
        if src.exists():
            dst = out_dir / f"{_stem(run)}_{name}"
            shutil.copyfile(src, dst)
            sec.image(dst, f"modality gap: {name[4:-4]}")
    return sec


def comparison_section(runs: list[RunDir], out_dir: Path, title: str = "Runs compared", stem: str = "compare",
                       groups: list[str] | None = None) -> Section:
    """Overlaid curves (one colour per group, default per run), then, without groups, one table of every
    run's newest evaluation (an ablation's table already has them)."""
    sec = Section(title)
    png = plots.compare_curves([(r.name, r.metrics) for r in runs], out_dir / f"{stem}_curves.png", groups)
    if png:
        sec.image(png, "training curves of " + ", ".join(r.name for r in runs))
    if groups:
        return sec
    latest = [r.evals[-1][1] if r.evals else {} for r in runs]
    keys = []
    for res in latest:
        for task, vals in res.items():
            if isinstance(vals, dict) and task not in NOT_TASKS:
                keys += [(task, k) for k, v in vals.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool) and (task, k) not in keys]
    if keys:
        rows = [[f"{t}/{k}"] + [res.get(t, {}).get(k) for res in latest] for t, k in keys]
        sec.html(f'<div class="wide">{table(["metric"] + [r.name for r in runs], rows, cls="compare")}</div>')
    else:
        sec.note("none of these runs has evaluation results")
    return sec


def ablation_sections(ab: AblationDir, out_dir: Path, member_runs: list[RunDir], missing: list[str] = ()
                      ) -> list[Section]:
    from ..ablate import METRICS
    res = ab.results
    sec = Section(f"Ablation study: {ab.name}")
    tab, rest = markdown_table(ab.table_md, cls="ablation")
    sec.html(tab)
    for line in rest:
        sec.text(line, "muted")
    stem = _stem(ab)
    png = plots.ablation_bars(res["rows"], [(k, h) for _, k, h in METRICS], out_dir / f"{stem}_bars.png")
    if png:
        sec.image(png, "ablation metrics: mean ± std over seeds per recipe")
    runs = [[r.get("recipe"), r.get("seed"), r.get("wall_s"), r.get("run_dir")] for r in res["runs"]]
    sec.html(table(["recipe", "seed", "wall s", "run directory"], runs, cls="ablation-runs"))
    if missing:
        sec.note(f"{len(missing)} run director{'y' if len(missing) == 1 else 'ies'} of results.json not found "
                 f"(curves not shown): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out = [sec]
    if member_runs:
        out.append(comparison_section(member_runs, out_dir, f"Runs of {ab.name} compared", f"{stem}_runs",
                                      groups=[r.name.split("/")[0] for r in member_runs]))
    return out
