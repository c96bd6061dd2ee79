"""Exact behaviour of the report and ablation helpers, on hand-built inputs (no training).

Pins: ``fmt``'s thresholds (1000 and 1), ``table``'s numeric cells (bools are not numbers), ``markdown_table``'s
rule-row detection, ``slug`` and the per-column section ids of ``render``; ``Metrics.series`` (finite numbers
with a step only), ``objectives``, ``read_metrics``' 1-based bad-line numbers, ``find_evals``' oldest-first order,
``open_input`` on a checkpoint directory / a run with only checkpoints, ``unique_names``; the plot helpers'
prefix order, empty-panel removal, grid width and bar-chart selection; ``pick_queries`` (also when more are
asked than there are images), ``tile_box``, the red sixth tile of the retrieval grid and a query's rank when two
images share its caption (``tiny_clip``, untrained); the eval / comparison / gap sections; ``default_out``,
``describe`` and ``build_report``'s argument checks; ``summarize``' sample std, ``format_table``'s varied
columns, ``footer``, and ablate's config checks (``_check_same`` with ``vary``, ``_flat``, ``_config_mismatch``,
``_check_tasks``, hidden recipe files, ``study_vary``, ``--seeds``, another study's --out, reserved overrides).
"""
import argparse
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finealign import ablate
from finealign.ablate_table import footer, format_table, summarize
from finealign.config import load_config
from finealign.report import build_report, default_out, describe
from finealign.report import plots
from finealign.report.html import Section, fmt, markdown_table, render, slug, table
from finealign.report.inputs import AblationDir, Metrics, RunDir, find_evals, open_input, read_metrics, unique_names
from finealign.report.model_views import (GREY, RED, TOP, Gallery, draw_retrieval_grid, load_gallery, pick_queries,
                                          tile_box)
from finealign.report.sections import _stem, comparison_section, eval_section, gap_section

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- html

def test_fmt_thresholds_and_table_cells():
    assert [fmt(1000.0), fmt(999.5), fmt(1.0), fmt(0.5), fmt(0.123456), fmt(-1.0)] == \
        ["1000.0", "999.50", "1.00", "0.5", "0.1235", "-1.00"]
    assert (fmt(None), fmt(True), fmt(3)) == ("–", "True", "3")
    html = table(["a<b", "v"], [["x", 3], ["y", True]])
    assert "<th>a&lt;b</th>" in html
    assert '<td class="num">3</td>' in html and "<td>True</td>" in html


def test_markdown_table_skips_only_the_rule_row():
    md = "| recipe | x |\n|---|---:|\n| a | - |\n| b | 1.0 ± 0.0 |\n\nseeds: 0 · steps: 2\n"
    html, rest = markdown_table(md, cls="ablation")
    assert html == table(["recipe", "x"], [["a", "-"], ["b", "1.0 ± 0.0"]], cls="ablation")
    assert rest == ["seeds: 0 · steps: 2"]


def test_slug_and_unique_section_ids_for_runs_of_one_name():
    assert slug("Retrieval: text → top-5 images") == "retrieval-text-top-5-images"
    page = render("t", "m", [Section("Runs compared")],
                  [("seed0", [Section("Training curves")]), ("seed0", [Section("Training curves")])])
    assert '<section id="runs-compared" data-section="runs-compared"><h2>' in page
    assert 'id="seed0-0-training-curves"' in page and 'id="seed0-1-training-curves"' in page


# ---------------------------------------------------------------- inputs

def test_metrics_series_keys_and_objectives():
    m = Metrics(rows=[{"step": 1, "train/loss": 2, "train/itc/loss": 1.0},
                      {"step": 2, "train/loss": float("nan"), "val/itc/loss": 0.5},
                      {"train/loss": 3.0},                               # no step: not a point
                      {"step": 4, "train/loss": True, "train/z/loss/ema": 1.0},
                      {"step": 5, "train/loss": 1.5, "train/ic/loss": 2.0}])
    assert m.series("train/loss") == ([1, 5], [2.0, 1.5])
    assert m.objectives() == ["itc", "ic"]                              # not "z" (4 parts)
    assert "step" not in m.keys()


def test_read_metrics_numbers_bad_lines_from_one(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n\nnot json\n[1, 2]\n{"step": 2}\n')
    m = read_metrics(f)
    assert m.rows == [{"step": 1}, {"step": 2}] and m.bad_lines == [3, 4]


def test_find_evals_oldest_first_and_skips_unreadable(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    a, b = tmp_path / "eval_a.json", tmp_path / "checkpoints" / "step_00000002" / "eval_test.json"
    a.write_text('{"n": "a"}')
    b.write_text('{"n": "b"}')
    (tmp_path / "eval_bad.json").write_text("[1]")
    os.utime(a, (2000, 2000))
    os.utime(b, (1000, 1000))
    assert find_evals(tmp_path) == [(b, {"n": "b"}), (a, {"n": "a"})]


def run_dir_with(tmp_path, metrics=True, ckpt=False):
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "clip", "train": {"steps": 2}}))
    if metrics:
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "train/loss": 3.0 - s, "train/itc/loss": 2.0 - s / 2, "train/lr": 1e-3})
            + "\n" for s in (1, 2, 3)))
    if ckpt:
        c = run / "checkpoints" / "step_00000003"
        c.mkdir(parents=True)
        (c / "model.safetensors").write_bytes(b"")
    return run


def test_open_input_checkpoint_dir_and_checkpoint_only_run(tmp_path):
    run = run_dir_with(tmp_path, metrics=False, ckpt=True)
    got = open_input(run / "checkpoints" / "step_00000003")
    assert isinstance(got, RunDir) and got.path == run and got.name == "myrun"
    assert got.checkpoint == run / "checkpoints" / "step_00000003" and got.metrics.rows == []


def test_unique_names_parent_then_number():
    ab = lambda p: AblationDir(path=Path(p), name=Path(p).name, results={}, table_md="")    # noqa: E731
    items = [ab("x/a/seed0"), ab("x/b/seed0"), ab("x/c/seed1")]
    unique_names(items)
    assert [i.name for i in items] == ["a/seed0", "b/seed0", "seed1"]
    items = [ab("p/a/s"), ab("q/a/s"), ab("r/a/s")]
    unique_names(items)
    assert [i.name for i in items] == ["a/s", "a/s (2)", "a/s (3)"]


# ---------------------------------------------------------------- plots

def test_prefix_order_and_loss_panels_drop_empty_ones():
    m = Metrics(rows=[{"step": 1, "val/loss": 1.0, "train/loss": 2.0, "a/loss": 1.0, "train/itc/loss": 1.0,
                       "val/ic/loss": float("nan")}])
    assert plots._prefixes(m) == ["train", "a", "val"]
    assert plots.loss_panels(m) == [("total loss", ["train/loss", "a/loss", "val/loss"]),
                                    ("itc loss", ["train/itc/loss"])]


def test_grid_width_follows_the_panel_count():
    plt = plots._plt()
    fig, axes = plots._grid(plt, 2, cols=3)
    assert len(axes) == 2 and tuple(fig.get_size_inches()) == pytest.approx((8.0, 2.8))
    plt.close(fig)


def test_ablation_bars_draw_a_metric_any_row_has(tmp_path):
    rows = [{"recipe": "a", "metrics": {"t2i_r1": {"mean": 1.0, "std": 0.5}, "cider": None}},
            {"recipe": "b", "metrics": {"t2i_r1": None, "cider": None}}]
    assert plots.ablation_bars(rows, [("t2i_r1", "t2i"), ("cider", "CIDEr")], tmp_path / "b.png").exists()
    assert plots.ablation_bars(rows, [("cider", "CIDEr")], tmp_path / "c.png") is None


# ---------------------------------------------------------------- model views

def test_pick_queries_spread_and_capped():
    assert pick_queries(Gallery(list(range(10)), [], 0), 4) == [0, 3, 6, 9]
    assert pick_queries(Gallery(list(range(3)), [], 0), 3) == [0, 1, 2]
    assert pick_queries(Gallery(list(range(7)), [], 0), 2) == [0, 6]
    assert pick_queries(Gallery(list(range(5)), [], 0), 1) == [0]
    assert pick_queries(Gallery(list(range(3)), [], 0), 5) == [0, 1, 2]            # more asked than there are
    assert pick_queries(Gallery(list(range(16)), [], 0), 20) == list(range(16))


def test_load_gallery_limit_and_needs_two_images():
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=8"])
    g = load_gallery(cfg, cfg.data.test, 3)
    assert len(g.samples) == len(g.images) == 3 and g.skipped == 0
    with pytest.raises(ValueError, match="has 1 readable image"):
        load_gallery(cfg, cfg.data.test, 1)


def test_tile_box_layout():
    assert tile_box(0, 0) == (8, 38, 80, 110)
    assert tile_box(1, 2) == (168, 148, 240, 220)


def test_red_sixth_tile_only_when_rank_beyond_top(tmp_path):
    g = Gallery(list(range(7)), [Image.new("RGB", (20, 20), (0, 0, 255)) for _ in range(7)], 0)
    rows = [{"query": "q", "top": [0, 1, 2, 3, 4], "correct": [6], "rank": 7, "best_correct": 6},
            {"query": "r", "top": [0, 1, 2, 3, 4], "correct": [4], "rank": TOP, "best_correct": 4}]
    with Image.open(draw_retrieval_grid(g, rows, tmp_path / "g.png")) as im:
        x0, y0 = tile_box(0, TOP)[:2]
        assert im.getpixel((x0 + 1, y0 + 1)) == RED
        x1, y1 = tile_box(1, TOP)[:2]
        assert im.getpixel((x1 + 1, y1 + 1)) == (255, 255, 255)
        assert im.getpixel(tuple(v + 1 for v in tile_box(1, 0)[:2])) == GREY


# ---------------------------------------------------------------- sections

def hand_run(tmp_path, name="r", evals=(), gap=None):
    return RunDir(path=tmp_path, name=name, config={}, metrics=Metrics(), evals=list(evals), checkpoint=None,
                  gap=gap)


def test_eval_section_tables_tasks_not_timing(tmp_path):
    res = {"retrieval": {"t2i_r1": 1.5, "flag": True, "name": "x"}, "timing": {"wall_s": 3.0}}
    html = "".join(p for p in eval_section(hand_run(tmp_path, evals=[(tmp_path / "eval_t.json", res)])).parts)
    assert 'class="eval eval-retrieval"' in html and "eval-timing" not in html and "wall_s" not in html
    assert "<td>t2i_r1</td>" in html and "<td>name</td>" in html and "flag" not in html


def test_comparison_uses_each_runs_newest_eval(tmp_path):
    old, new = {"retrieval": {"t2i_r1": 1.0}}, {"retrieval": {"t2i_r1": 2.0}}
    runs = [hand_run(tmp_path, "a", [(tmp_path / "e1.json", old), (tmp_path / "e2.json", new)]),
            hand_run(tmp_path, "b", [(tmp_path / "e3.json", old)])]
    html = "".join(comparison_section(runs, tmp_path).parts)
    assert table(["metric", "a", "b"], [["retrieval/t2i_r1", 2.0, 1.0]], cls="compare") in html


def test_gap_section_and_stem(tmp_path):
    html = "".join(gap_section(hand_run(tmp_path, gap={"n_pairs": 5, "other": 1}), tmp_path).parts)
    assert html == table(["statistic", "value"], [["n_pairs", 5]], cls="gap")
    assert gap_section(hand_run(tmp_path), tmp_path) is None
    assert _stem(hand_run(tmp_path, "a_b/seed0 (2)")) == "a_b_seed0__2_"


# ---------------------------------------------------------------- report entry

def test_default_out_describe_and_argument_checks(tmp_path):
    assert default_out(["a"]) == Path("a/report.html") and default_out(["a", "b"]) == Path("report.html")
    run = hand_run(tmp_path)
    run.config = {"objectives": {"itc": {"weight": 1.0}, "ic": {"weight": 0}, "x": 3},
                  "masking": {"ic": {"ratio": 0.5}, "mim": None}, "model": {"arch": "coca"}}
    d = dict(describe(run))
    assert (d["objectives"], d["maskers"], d["model"], d["checkpoint"]) == \
        ("itc ×1.0", "ic", "coca (preset –)", "none")
    with pytest.raises(ValueError, match="--num must be at least 1"):
        build_report([tmp_path / "nope"], num=0)


def test_report_of_a_run_without_checkpoint_as_htm(tmp_path):
    run = run_dir_with(tmp_path)
    with pytest.raises(ValueError, match="HTML file"):
        build_report([run], tmp_path / "r.txt", progress=False)
    out = build_report([run], tmp_path / "r.htm", progress=False)
    text = out.read_text()
    assert 'id="myrun-0-training-curves"' in text and "3 logged steps (last: 3); objectives: itc" in text
    assert (tmp_path / "r_files" / "myrun_losses.png").exists()


# ---------------------------------------------------------------- ablation table

def test_summarize_sample_std_and_varied_columns():
    runs = [{"recipe": "r", "seed": s, "results": {"retrieval": {"t2i_r1": v}}} for s, v in enumerate((1, 2, 4))]
    (row,) = summarize(runs)
    assert row["metrics"]["t2i_r1"]["mean"] == pytest.approx(7 / 3)
    assert row["metrics"]["t2i_r1"]["std"] == pytest.approx(math.sqrt(7 / 3))     # ddof=1
    row["varied"] = {"data.fraction": 0.5}
    assert format_table([row]).splitlines()[:3] == [
        "| recipe | data.fraction | t2i R@1 |", "|---|---:|---:|", "| r | 0.5 | 2.3 ± 1.5 |"]


def test_footer_names_generated_or_root():
    common = {"data.source": "shapes", "data.root": "/d", "data.train": "tr", "data.val": "va",
              "data.test": "te", "data.fraction": 1.0, "data.num_samples": 8, "data.seed": 0,
              "train.steps": 2, "data.batch_size": 4, "train.grad_accum": 1}
    assert "data: shapes (generated, splits tr/va/te" in footer([0, 1], common, None)
    common["data.source"] = "coco"
    assert "coco (root /d," in footer([0], common, "cmd") and footer([0], common, "cmd").endswith("`cmd`")


# ---------------------------------------------------------------- ablate checks

def test_check_same_honours_vary_and_flat():
    a, b = load_config("clip"), load_config("clip", ["data.fraction=0.5"])
    ablate._check_same({"a": a, "b": b}, vary=["data.fraction"])
    with pytest.raises(ValueError, match="recipe 'b' has data.fraction=0.5"):
        ablate._check_same({"a": a, "b": b})
    assert ablate._flat({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}


def test_config_mismatch_ignores_run_dir_only(tmp_path):
    cfg = load_config("clip", ["train.run_dir=/somewhere/else"])
    saved = load_config("clip", [f"train.run_dir={tmp_path}"]).to_dict()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert ablate._config_mismatch(tmp_path, cfg) is None
    other = load_config("clip", ["train.run_dir=/x", "train.lr=0.5"])
    assert ablate._config_mismatch(tmp_path, other).startswith("train.lr: saved ")


def test_check_tasks_needs_a_decoder_or_maccap():
    clip = load_config("clip")                                   # arch coca, decoder_layers 0
    ablate._check_tasks("clip", clip, ["retrieval"])
    with pytest.raises(ValueError, match="--task caption: recipe clip has no caption decoder"):
        ablate._check_tasks("clip", clip, ["caption"])
    ablate._check_tasks("coca", load_config("coca"), ["caption"])
    with pytest.raises(ValueError, match="--task vqa"):
        ablate._check_tasks("coca", load_config("coca"), ["vqa"])


def test_recipe_files_study_vary_and_cli_checks(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    for name in ("a.yaml", ".hidden.yaml", "_base.yml"):
        (d / name).write_text("base: clip\n")
    assert [p.name for p in ablate.discover_recipes(d)] == ["a.yaml"]
    (d / "_study.yaml").write_text("vary: [train.lr]\n")
    with pytest.raises(ValueError, match="'vary' must list keys among"):
        ablate.study_vary(d)
    args = argparse.Namespace(seed_list=None, seeds=0, path=str(d), out=None, task=None, no_progress=True,
                              no_resume=False, overrides=[])
    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        ablate.cmd_ablate(args)
    with pytest.raises(ValueError, match="drop train.run_dir=x"):
        ablate.run_ablation(d, overrides=["train.run_dir=x"], out_dir=tmp_path / "o", progress=False)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.json").write_text(json.dumps({"path": str(tmp_path / "other")}))
    with pytest.raises(ValueError, match="holds the results of another study"):
        ablate._check_same_study(tmp_path / "o", d)
    ablate._check_same_study(tmp_path / "o", tmp_path / "other")


def test_retrieval_rank_is_the_best_ranked_image_the_query_describes(tiny_clip):
    """Two gallery images share a caption: the row's rank is that of the better-ranked one (1), not the other."""
    import torch
    from finealign.eval.runner import embed_texts
    from finealign.report.model_views import retrieval_rows
    from finealign.types import Sample
    caps = ["a red circle", "a blue square", "a red circle", "two green triangles"]
    gallery = Gallery([Sample(str(i), lambda: None, [c], image_id=i) for i, c in enumerate(caps)], [], 0)
    m = tiny_clip
    q = embed_texts(m.model, m.tokenizer, ["a red circle"], m.config.model.context_length, "cpu")[0]
    # scores for query "a red circle": image 2 first, then 1, then 3, then image 0 (also "a red circle") last
    img = torch.stack([0.1 * q, 0.8 * q, 1.0 * q, 0.5 * q])
    row = retrieval_rows(m, gallery, img, num=1)[0]
    assert row["source"] == 0 and row["correct"] == [0, 2]
    assert row["top"] == [2, 1, 3, 0] and row["rank"] == 1 and row["best_correct"] == 2
