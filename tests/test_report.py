"""``finealign report``: a self-contained HTML page of real tiny runs (SyCoCa: masks + captions, TiMix: mixing),
two runs side by side, an ablation study, a run without checkpoints, and the error for a non-run directory."""
import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from finealign.ablate import run_ablation
from finealign.api import load
from finealign.cli import main
from finealign.data.loader import build_source, unique_images
from finealign.data.skips import SkipLog
from finealign.data.transforms import ImageTransform
from finealign.eval.runner import embed_texts
from finealign.report import NotARunDir, build_report, quick_eval
from finealign.report.html import fmt
from finealign.report.inputs import open_input
from finealign.report.model_views import GREEN, GREY, RED, TOP, tile_box

# shrunken model + 64 procedural shapes: each run trains 3 steps in a few seconds
COMMON = """data: {source: shapes, num_samples: 64, batch_size: 16}
train: {steps: 3, ckpt_every: 0, log_every: 1, threads: 2}
model: {vision_width: 32, vision_layers: 1, vision_heads: 2, text_width: 32, text_layers: 1,
        text_heads: 2, embed_dim: 32, caption_queries: 4}
tokenizer: {vocab_size: 256}
eval: {max_images: 16, decode: greedy, max_new_tokens: 6}
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """An ablation directory of two real runs: SyCoCa (attentive / text-guided masks, captioner) and TiMix."""
    root = tmp_path_factory.mktemp("report")
    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "a_sycoca.yaml").write_text("# SyCoCa\nbase: sycoca\n" + COMMON)
    (recipes / "b_timix.yaml").write_text("# TiMix\nbase: timix\n" + COMMON)
    out = root / "study"
    run_ablation(recipes, seeds=1, out_dir=out, tasks=["retrieval"], progress=False)
    return out


class Page(HTMLParser):
    """Collects the <img> attributes, every tag, and the text of the sections by kind (data-section; the
    text of one kind in several run columns is concatenated); ids must be unique."""

    def __init__(self, text):
        super().__init__()
        self.imgs, self.tags, self.sections, self.runs, self.ranks = [], [], {}, [], []
        self._open, self.ids = [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.imgs.append(a)
        if tag == "section":
            assert a["id"] not in self.ids
            self.ids.add(a["id"])
            self._open.append(a["data-section"])
            self.sections.setdefault(a["data-section"], "")
        if tag == "div" and "data-run" in a:
            self.runs.append(a["data-run"])
        if tag == "tr" and "data-rank" in a:
            self.ranks.append(int(a["data-rank"]))

    def handle_endtag(self, tag):
        if tag == "section":
            self._open.pop()

    def handle_data(self, data):
        for sid in self._open:
            self.sections[sid] += data + " "


def parse(path):
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # self-contained: no scripts, stylesheets, fonts or images fetched from anywhere
    assert not [t for t, a in page.tags if t in ("script", "link", "iframe", "object")]
    assert "url(" not in text and "http://" not in text and "https://" not in text
    assert page.imgs
    files = path.with_name(path.stem + "_files")
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), img["src"][:40]
        raw = base64.b64decode(img["src"][len(prefix):], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "PNG" and im.width > 10 and im.height > 10
            im.verify()
        assert raw == (files / img["data-file"]).read_bytes()      # the PNG behind it, beside the page
        assert img["alt"]
    return page


def run_dir(study, recipe):
    return study / recipe / "seed0"


def logged_objectives(run):
    keys = set().union(*(json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()))
    return sorted({k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith("/loss")})


@pytest.fixture(scope="module")
def sycoca_report(study, tmp_path_factory):
    run = run_dir(study, "a_sycoca")
    return run, build_report([run], tmp_path_factory.mktemp("single") / "g.html", num=5, progress=False)


def test_single_run_report_has_curves_evals_captions_masks(sycoca_report):
    run, out = sycoca_report
    page = parse(out)
    curves = page.sections["training-curves"]
    objs = logged_objectives(run)
    assert set(objs) == {"itc", "ic", "tg_mim"}
    for o in objs:
        assert f"{o} loss" in [a["alt"] for a in page.imgs if a["alt"].startswith("losses")][0]
        assert o in curves
    alts = " | ".join(a["alt"] for a in page.imgs)
    assert "learning rate" in alts and "samples / s" in alts
    res = json.loads((run / "eval_test.json").read_text())
    ev = page.sections["evaluation"]
    assert "eval_test.json" in ev and fmt(res["retrieval"]["t2i_r1"]) in ev
    # bookkeeping blocks of the results (skip counts, timing) are not shown as metric tables
    assert "timing" in res and "skipped" in res
    classes = [a.get("class", "") for t, a in page.tags if t == "table"]
    assert "eval eval-retrieval" in classes and "eval eval-timing" not in classes
    assert "eval eval-skipped" not in classes and "wall_s" not in ev
    # the run section names the checkpoint the views come from
    assert "step_00000003" in page.sections["run"]
    caps = [a for t, a in page.tags if t == "figure"]
    assert len(caps) == 5
    assert page.sections["caption-samples"].count("generated:") == 5
    masks = [a for a in page.imgs if a["alt"].startswith("masks for")]
    assert len(masks) == 3 and "TG-MIM" in page.sections["mask-overlays"]
    assert "mixed-samples-timix" not in page.sections            # SyCoCa has no mixer


def test_retrieval_grid_outlines_the_correct_image(sycoca_report):
    run, out = sycoca_report
    page = parse(out)
    grid = out.with_name("g_files") / "seed0_retrieval.png"
    assert any(a["data-file"] == grid.name for a in page.imgs)
    # independently: embed the same gallery (first 20 test images) and rank each query's correct image
    m = load(run)
    gallery = unique_images(build_source(m.config.data, "test", SkipLog()))[:20]
    tf = ImageTransform(m.config.model.image_size, train=False)
    with torch.no_grad():
        img = m.model.encode_image(torch.stack([tf(s.load_image()) for s in gallery]))["embed"]
    queries = [gallery[i].captions[0] for i in (0, 5, 10, 14, 19)]
    txt = embed_texts(m.model, m.tokenizer, queries, m.config.model.context_length, "cpu")
    order = (txt @ img.t()).argsort(dim=1, descending=True).tolist()
    expected = [min(o.index(j) for j, s in enumerate(gallery) if q in s.captions) + 1
                for q, o in zip(queries, order)]
    assert page.ranks == expected
    hits = sum(r <= TOP for r in expected)
    assert f"{hits}/5 queries have a correct image in their top 5." in page.sections["retrieval-text-top-5-images"]
    for q in queries:
        assert q in page.sections["retrieval-text-top-5-images"]
    with Image.open(grid) as im:
        px = im.convert("RGB")
        for row, (rank, o) in enumerate(zip(expected, order)):
            for col in range(TOP):
                left, top, _, _ = tile_box(row, col)
                correct = queries[row] in gallery[o[col]].captions
                assert px.getpixel((left + 1, top + 1)) == (GREEN if correct else GREY), (row, col)
            left, top, _, _ = tile_box(row, TOP)
            assert (px.getpixel((left + 1, top + 1)) == RED) == (rank > TOP), row


def test_two_runs_side_by_side(study, tmp_path):
    # a: given by its checkpoint directory (the report maps it to its run); b: a copy with a newer eval file
    # whose name sorts before eval_test.json, and an older checkpoint beside the newest
    a = run_dir(study, "a_sycoca") / "checkpoints" / "step_00000003"
    b = tmp_path / "b_timix" / "seed0"
    shutil.copytree(run_dir(study, "b_timix"), b)
    shutil.copytree(b / "checkpoints" / "step_00000003", b / "checkpoints" / "step_00000001")
    newer = {"retrieval": {"t2i_r1": 87.4321},
             "evaluated_on": {"split": "test", "source": "shapes", "root": None, "max_images": 16}}
    (b / "eval_a.json").write_text(json.dumps(newer))
    t = (b / "eval_test.json").stat().st_mtime
    os.utime(b / "eval_a.json", (t + 10, t + 10))
    page = parse(build_report([a, b], tmp_path / "two.html", num=2, progress=False))
    assert page.runs == ["a_sycoca/seed0", "b_timix/seed0"]
    cmp = page.sections["runs-compared"]
    assert "a_sycoca/seed0" in cmp and "b_timix/seed0" in cmp and "retrieval/t2i_r1" in cmp
    assert fmt(87.4321) in cmp and "evaluated_on" not in cmp        # b's newest evaluation is compared
    ev = page.sections["evaluation"]
    assert "eval_a.json" in ev and "eval_test.json" in ev and "evaluated_on" not in ev
    about = page.sections["run"]
    assert about.count("step_00000003") == 2 and "step_00000001" not in about      # each run's newest
    compared = [x for x in page.imgs if x["alt"].startswith("training curves of")]
    assert compared and "a_sycoca/seed0" in compared[0]["alt"]
    assert any(x["alt"].startswith("timix mixed samples") for x in page.imgs)
    assert sum(x["alt"].startswith("masks for") for x in page.imgs) == 2      # only the SyCoCa column
    assert "pta" in page.sections["training-curves"] and "mixed_itc" in page.sections["training-curves"]


def test_ablation_directory_renders_table_and_bars(study, tmp_path):
    page = parse(build_report([study], tmp_path / "ab.html", progress=False))
    text = page.sections["ablation-study-study"]
    header = (study / "table.md").read_text().splitlines()[0].strip("| ").split(" | ")
    for h in header:
        assert h in text
    for recipe in ("a_sycoca", "b_timix"):
        assert recipe in text
    results = json.loads((study / "results.json").read_text())
    cell = results["rows"][0]["metrics"]["t2i_r1"]
    assert f"{cell['mean']:.1f} ± {cell['std']:.1f}" in text
    assert any(x["alt"].startswith("ablation metrics") for x in page.imgs)
    assert "runs-of-study-compared" in page.sections
    # the member runs' curves are compared, but no second metrics table (the ablation table has them)
    assert "retrieval/t2i_r1" not in page.sections["runs-of-study-compared"]
    assert not [a for t, a in page.tags if t == "table" and a.get("class") == "compare"]
    assert [a["alt"] for a in page.imgs if a["alt"].startswith("training curves of")] == [
        "training curves of a_sycoca/seed0, b_timix/seed0"]


def test_run_without_checkpoints_gets_curves_and_cli_eval(study, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(run_dir(study, "b_timix") / f, bare / f)
    n = len((bare / "metrics.jsonl").read_text().splitlines())
    with open(bare / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "train/loss": \n')                   # a torn last line
    assert main(["report", str(bare), "--no-progress"]) == 0
    page = parse(bare / "report.html")
    assert "1 unreadable line(s) skipped (line " + str(n + 1) + ")" in page.sections["training-curves"]
    assert "no checkpoint" in page.sections["model"]
    assert "no evaluation results" in page.sections["evaluation"]
    assert "report written to" in capsys.readouterr().out
    # --eval evaluates the latest checkpoint first and the report shows it
    run = tmp_path / "timix"
    shutil.copytree(run_dir(study, "b_timix"), run)
    assert main(["report", str(run), "--eval", "--num", "2", "--no-progress", "--out", str(tmp_path / "e.html")]) == 0
    res = json.loads((run / "eval_test_report.json").read_text())
    assert res["report_eval"]["max_images"] == 16
    assert "eval_test_report.json" in parse(tmp_path / "e.html").sections["evaluation"]
    # the report's cap wins over a larger eval.max_images of the run (16 here)
    res = json.loads(quick_eval(open_input(run), None, False, max_images=8).read_text())
    assert res["report_eval"]["max_images"] == 8 and res["num_images"] == 8


def test_modality_gap_and_ablation_with_moved_runs(study, tmp_path):
    run = tmp_path / "timix"
    shutil.copytree(run_dir(study, "b_timix"), run)
    assert main(["analyze", "gap", str(run), "--max-images", "16", "-k", "2", "--no-progress"]) == 0
    gap = json.loads((run / "gap" / "gap.json").read_text())
    page = parse(build_report([run], tmp_path / "gap.html", num=2, progress=False))
    assert fmt(gap["suggested_noise_var"]) in page.sections["modality-gap"]
    assert sorted(a["alt"] for a in page.imgs if a["alt"].startswith("modality gap")) == [
        "modality gap: hist", "modality gap: qq", "modality gap: subregions"]
    # an ablation directory whose runs are gone still renders its table, and says what it could not find
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(study / "table.md", moved / "table.md")
    res = json.loads((study / "results.json").read_text())
    for r in res["runs"]:
        r["run_dir"] = f"elsewhere/{r['recipe']}/seed0"
    (moved / "results.json").write_text(json.dumps(res))
    page = parse(build_report([moved], tmp_path / "moved.html", progress=False))
    text = page.sections["ablation-study-moved"]
    assert "2 run directories of results.json not found" in text and "elsewhere/a_sycoca/seed0" in text
    assert "runs-of-moved-compared" not in page.sections


def test_not_a_run_dir_is_a_clear_error(study, tmp_path, capsys):
    empty = tmp_path / "just_files"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(NotARunDir, match="just_files is not a run directory: it has no config.yaml"):
        build_report([run_dir(study, "a_sycoca"), empty], tmp_path / "x.html", progress=False)
    assert not (tmp_path / "x.html").exists()                        # checked before any work
    assert main(["report", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    # the page is HTML: another --out suffix is refused before anything is written
    out = tmp_path / "r.pdf"
    assert main(["report", str(run_dir(study, "a_sycoca")), "--out", str(out), "--no-progress"]) == 2
    assert "r.pdf: the report is an HTML file (give --out NAME.html)" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r_files").exists()
