"""Ablation runner: recipes x seeds at equal steps and data, mean ± std table, resume, CLI, format_table."""
import argparse
import json
import shutil
import statistics

import pytest
import yaml

import finealign.train.loop as loop
from finealign.ablate import (AblationInterrupted, add_ablate_parser, cmd_ablate, discover_recipes, study_vary,
                              format_table, recipe_description, run_ablation, summarize)

# shrunken model + tiny shapes data: each run trains 2 steps and evaluates 16 images in a few seconds
COMMON = """data: {source: shapes, num_samples: 64, batch_size: 16}
train: {steps: STEPS, ckpt_every: 0, log_every: 1, threads: 2}
model: {vision_width: 32, vision_layers: 1, vision_heads: 2, text_width: 32, text_layers: 1,
        text_heads: 2, embed_dim: 32, caption_queries: 4}
tokenizer: {vocab_size: 256}
"""


def write_recipe(path, base, tasks, description, steps=2):
    path.write_text(f"# {description}\nbase: {base}\n" + COMMON.replace("STEPS", str(steps))
                    + f"eval: {{max_images: 16, tasks: [{', '.join(tasks)}]}}\n")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    recipes = root / "recipes"
    recipes.mkdir()
    # caption scoring starts Java (METEOR, ~10 s): only the CLI test below runs it
    write_recipe(recipes / "b_coca.yaml", "coca", ["retrieval"], "CoCa: ITC + IC")
    write_recipe(recipes / "a_clip.yaml", "clip", ["retrieval", "classify"], "CLIP baseline")
    out = root / "out"
    res = run_ablation(recipes, seeds=2, out_dir=out, progress=False, command="finealign ablate X")
    return recipes, out, res


def per_run(out, recipe, seed):
    return json.loads((out / recipe / f"seed{seed}" / "eval_test.json").read_text())


def test_writes_table_and_results_for_every_recipe_and_seed(study):
    recipes, out, res = study
    assert res["out_dir"] == out
    table = (out / "table.md").read_text()
    assert table == res["table"]
    lines = table.splitlines()
    assert lines[0] == "| recipe | t2i R@1 | i2t R@1 | mean R | top-1 |"
    assert [l.split(" | ")[0] for l in lines[2:4]] == ["| a_clip", "| b_coca"]   # discovery order
    assert "seeds: 0, 1" in lines[-1] and "steps: 2" in lines[-1] and "shapes" in lines[-1]
    assert "command: `finealign ablate X`" in lines[-1]
    data = json.loads((out / "results.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in data["runs"]] == [
        ("a_clip", 0), ("a_clip", 1), ("b_coca", 0), ("b_coca", 1)]
    assert [r["seeds"] for r in data["rows"]] == [[0, 1], [0, 1]]
    assert data["recipes"][0]["description"] == "CLIP baseline"
    assert data["command"] == "finealign ablate X" and data["common"]["train.steps"] == 2
    for run in data["runs"]:
        assert run["wall_s"] > 0 and run["config"]["train.seed"] == run["seed"]
    # seeds change the model init only: the data (data.seed) is the same in every run
    assert {r["config"]["data.seed"] for r in data["runs"]} == {0}


def test_cells_are_mean_and_sample_std_of_the_per_run_results(study):
    _, out, res = study
    rows = {r["recipe"]: r for r in res["rows"]}
    lines = {l.split(" | ")[0][2:]: l for l in res["table"].splitlines()[2:4]}
    for recipe, metrics in [("a_clip", [("retrieval", "t2i_r1"), ("retrieval", "i2t_r1"),
                                        ("retrieval", "mean_recall"), ("classify", "top1")]),
                            ("b_coca", [("retrieval", "t2i_r1"), ("retrieval", "i2t_r1"),
                                        ("retrieval", "mean_recall")])]:
        cells = [c.strip() for c in lines[recipe].strip("| ").split("|")][1:]
        for i, (task, key) in enumerate(metrics):
            vals = [per_run(out, recipe, s)[task][key] for s in (0, 1)]
            mean, std = sum(vals) / 2, statistics.stdev(vals)
            stat = rows[recipe]["metrics"][key]
            assert stat["mean"] == pytest.approx(mean) and stat["std"] == pytest.approx(std)
            assert cells[i] == f"{mean:.1f} ± {std:.1f}"
    assert rows["b_coca"]["metrics"]["top1"] is None
    assert lines["b_coca"].rstrip().endswith("| – |")                  # CoCa has no classify result


def test_resume_does_not_retrain(study, monkeypatch):
    recipes, out, res = study
    ckpts = sorted(out.glob("*/seed*/checkpoints/step_*/model.safetensors"))
    assert len(ckpts) == 4
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    built = []
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: built.append(a) or pytest.fail("retrained"))
    again = run_ablation(recipes, seeds=2, out_dir=out, progress=False, command="finealign ablate X")
    assert built == [] and [p.stat().st_mtime_ns for p in ckpts] == mtimes
    assert again["rows"] == res["rows"] and again["table"] == res["table"]
    assert all(r["reused"] for r in again["runs"])


def test_resume_evaluates_again_a_run_that_lacks_a_task_asked_now(study, tmp_path):
    """Asking for a task a finished run was not evaluated on re-evaluates it from its final checkpoint
    (no training step); runs that hold every asked task are reused as they are."""
    recipes, out, res = study
    out = shutil.copytree(out, tmp_path / "out")        # the shared study stays as it was
    ckpts = sorted(out.glob("*/seed*/checkpoints/step_*/model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    again = run_ablation(recipes, seeds=2, out_dir=out, tasks=["retrieval", "classify"], progress=False)
    assert {(r["recipe"], r["reused"]) for r in again["runs"]} == {("a_clip", True), ("b_coca", False)}
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes                      # not retrained
    for seed in (0, 1):
        coca = per_run(out, "b_coca", seed)
        assert "classify" in coca and coca["tasks_asked"] == ["retrieval", "classify"]
        assert coca["retrieval"] == per_run(study[1], "b_coca", seed)["retrieval"]   # same weights, same ranks


def test_interrupted_run_continues_from_its_checkpoint(study):
    recipes, out, _ = study
    (out / "a_clip" / "seed1" / "eval_test.json").unlink()      # as if killed between training and eval
    # its checkpoint is reused, so its config is checked too (seed 1 only: seed 0 has its results)
    with pytest.raises(ValueError, match=r"a_clip.seed1 was run with a different config \(train\.lr"):
        run_ablation(recipes, seeds=[1], out_dir=out, progress=False, overrides=["train.lr=0.123"])
    assert not (out / "a_clip" / "seed1" / "eval_test.json").exists()
    again = run_ablation(recipes, seeds=2, out_dir=out, progress=False)
    assert [r["reused"] for r in again["runs"]] == [True, False, True, True]
    assert per_run(out, "a_clip", 1)["timing"]["resumed_from_checkpoint"] is True


def test_stopped_training_raises_and_the_rerun_finishes_it(tmp_path, monkeypatch):
    """SIGINT/SIGTERM make the Trainer save and return early: no eval_test.json, the rerun continues."""
    write_recipe(tmp_path / "a.yaml", "clip", ["retrieval"], "a")
    train = loop.Trainer.train
    monkeypatch.setattr(loop.Trainer, "train", lambda self: train(self, until=1))   # "killed" after step 1
    with pytest.raises(AblationInterrupted, match="stopped at step 1/2"):
        run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "a" / "seed0" / "eval_test.json").exists()
    monkeypatch.setattr(loop.Trainer, "train", train)
    run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    assert per_run(tmp_path / "out", "a", 0)["timing"]["resumed_from_checkpoint"] is True
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "a" / "seed0" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2]
    # --no-resume: retrained from scratch, the old checkpoints and metrics replaced
    res = run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False, resume=False)
    assert [r["reused"] for r in res["runs"]] == [False]
    run = tmp_path / "out" / "a" / "seed0"
    assert per_run(tmp_path / "out", "a", 0)["timing"]["resumed_from_checkpoint"] is False
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_a_run_dir_with_another_config(study):
    recipes, out, _ = study
    with pytest.raises(ValueError, match=r"a_clip.seed0 was run with a different config \(train\.lr"):
        run_ablation(recipes, seeds=2, out_dir=out, progress=False, overrides=["train.lr=0.123"])


def test_a_key_added_after_the_run_is_no_difference_at_its_default(study):
    """A run saved before a config key existed is reused while the key holds its default, refused otherwise."""
    recipes, out, _ = study
    saved = out / "a_clip" / "seed0" / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["model"]["mim_decoder_scale"]                 # as written by a finealign without that key
    saved.write_text(yaml.safe_dump(raw))
    again = run_ablation(recipes, seeds=2, out_dir=out, progress=False)
    assert all(r["reused"] for r in again["runs"])
    with pytest.raises(ValueError, match=r"model\.mim_decoder_scale: saved '–', now 0\.5"):
        run_ablation(recipes, seeds=2, out_dir=out, progress=False, overrides=["model.mim_decoder_scale=0.5"])


def test_recipes_with_different_steps_are_refused(tmp_path, monkeypatch):
    write_recipe(tmp_path / "a.yaml", "clip", ["retrieval"], "a")
    write_recipe(tmp_path / "b_long.yaml", "clip", ["retrieval"], "b", steps=3)
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=r"recipe 'b_long' has train\.steps=3 but 'a' has train\.steps=2"):
        run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    # an override applied to every recipe makes the steps equal; then the batch size of c differs
    (tmp_path / "c.yaml").write_text((tmp_path / "a.yaml").read_text().replace("batch_size: 16",
                                                                               "batch_size: 32"))
    with pytest.raises(ValueError, match=r"recipe 'c' has data\.batch_size=32 but 'a' has data\.batch_size=16"):
        run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False, overrides=["train.steps=2"])


def test_a_bundled_study_is_found_by_name_with_its_study_options(tmp_path, monkeypatch):
    """`finealign ablate ablations/timix` outside a checkout (no ./configs): the recipes and the study's
    _study.yaml (which lets data.fraction vary) both come from the bundled configs."""
    monkeypatch.chdir(tmp_path)
    assert len(discover_recipes("ablations/timix")) == 12
    assert study_vary("ablations/timix") == ["data.fraction"]


def test_discover_recipes_from_a_directory_or_a_list(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    for name in ("b.yaml", "a.yaml", "_base.yaml", "notes.txt"):
        (d / name).write_text("# desc of " + name + "\nbase: clip\n")
    assert [p.name for p in discover_recipes(d)] == ["a.yaml", "b.yaml"]
    assert recipe_description(d / "a.yaml") == "desc of a.yaml"
    lst = tmp_path / "list.yaml"
    lst.write_text("recipes: [study/b.yaml, coca]\n")               # relative paths and bundled names
    assert [p.stem for p in discover_recipes(lst)] == ["b", "coca"]
    lst.write_text("recipes: [study/a.yaml, study/a.yaml]\n")
    with pytest.raises(ValueError, match="unique"):
        discover_recipes(lst)
    with pytest.raises(FileNotFoundError):
        discover_recipes(tmp_path / "nope")
    bundled = [p.stem for p in discover_recipes("ablations/sycoca")]     # a bundled study by its name
    assert bundled[0] == "1-coca" and "8-sycoca-narrow" in bundled


def test_seeds_must_be_distinct(study, tmp_path, monkeypatch):
    recipes, _, _ = study
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("trained before checking"))
    for seeds in ([1, 1], []):
        with pytest.raises(ValueError, match="a positive count or a list of distinct seeds"):
            run_ablation(recipes, seeds=seeds, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_summarize_on_hand_runs_skips_non_finite_values():
    runs = [{"recipe": "r", "seed": 0, "results": {"retrieval": {"t2i_r1": float("nan"), "i2t_r1": 4.0}}},
            {"recipe": "r", "seed": 1, "results": {"retrieval": {"t2i_r1": 10.0, "i2t_r1": float("inf")}}},
            {"recipe": "s", "seed": 0, "results": {"retrieval": {"t2i_r1": float("nan")}, "classify": {}}}]
    r, s = summarize(runs)
    assert (r["recipe"], r["seeds"], s["recipe"], s["seeds"]) == ("r", [0, 1], "s", [0])
    assert r["metrics"]["t2i_r1"] == {"mean": 10.0, "std": 0.0, "n": 1, "values": [10.0]}
    assert r["metrics"]["i2t_r1"] == {"mean": 4.0, "std": 0.0, "n": 1, "values": [4.0]}
    assert s["metrics"]["t2i_r1"] is None and s["metrics"]["top1"] is None      # no finite value: "–"


def test_format_table_on_hand_rows():
    rows = [{"recipe": "coca", "metrics": {"t2i_r1": {"mean": 12.34, "std": 0.44}, "cider": {"mean": 50.0,
                                                                                           "std": 0.0}}},
            {"recipe": "sycoca", "metrics": {"t2i_r1": {"mean": 13.0, "std": 1.25}, "cider": None}}]
    assert format_table(rows) == (
        "| recipe | t2i R@1 | CIDEr |\n"
        "|---|---:|---:|\n"
        "| coca | 12.3 ± 0.4 | 50.0 ± 0.0 |\n"
        "| sycoca | 13.0 ± 1.2 | – |")


def test_cli_with_a_recipe_list_seed_list_and_captioning(tmp_path, capsys):
    """The one run that scores captions (Java METEOR): CIDEr and BLEU-4 columns appear."""
    write_recipe(tmp_path / "coca_cap.yaml", "coca", ["retrieval", "caption"], "CoCa with captions")
    (tmp_path / "study.yaml").write_text("recipes: [coca_cap.yaml]\n")
    sub = argparse.ArgumentParser(prog="finealign").add_subparsers(dest="verb")
    add_ablate_parser(sub)
    out = tmp_path / "out"
    # as cli.main parses: overrides may follow the options (parse_known_args, the rest appended)
    args, rest = sub._name_parser_map["ablate"].parse_known_args(
        [str(tmp_path / "study.yaml"), "--seed-list", "7", "--out", str(out), "--no-progress",
         "eval.max_new_tokens=5"])
    args.overrides += rest
    assert cmd_ablate(args) == 0
    printed = capsys.readouterr().out
    assert "| recipe | t2i R@1 | i2t R@1 | mean R | CIDEr | BLEU-4 |" in printed
    assert f"{out / 'table.md'}" in printed
    res = per_run(out, "coca_cap", 7)
    row = next(l for l in printed.splitlines() if l.startswith("| coca_cap |"))
    cells = [c.strip() for c in row.strip("| ").split("|")]
    assert cells[4] == f"{res['caption']['cider']:.1f} ± 0.0"       # one seed: std 0
    assert cells[5] == f"{res['caption']['bleu4']:.1f} ± 0.0"
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [7] and "--seed-list 7" in data["command"]
    # the generated captions stay in the run's eval_test.json, out of results.json
    assert res["samples"] and "samples" not in data["runs"][0]["results"]
    assert data["runs"][0]["results"]["caption"] == res["caption"]
    assert "eval.max_new_tokens=5" in data["command"]
    with pytest.raises(SystemExit):                                 # --seeds and --seed-list exclude
        sub._name_parser_map["ablate"].parse_args(["x", "--seeds", "2", "--seed-list", "1"])


def test_a_study_may_vary_the_declared_keys_and_shows_them_as_columns(tmp_path, monkeypatch):
    write_recipe(tmp_path / "a.yaml", "clip", ["retrieval"], "a")
    b = (tmp_path / "a.yaml").read_text().replace("batch_size: 16}", "batch_size: 16, fraction: 0.5}")
    (tmp_path / "b.yaml").write_text(b)
    monkeypatch.setattr(loop, "Trainer", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ValueError, match=r"data\.fraction=0\.5"):
        run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    (tmp_path / "_study.yaml").write_text("vary: [train.lr]\n")          # not a key that must match
    with pytest.raises(ValueError, match="'vary' must list keys among"):
        run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    (tmp_path / "_study.yaml").write_text("vary: [data.fraction]\n")
    monkeypatch.undo()
    res = run_ablation(tmp_path, seeds=1, out_dir=tmp_path / "out", progress=False)
    assert [r["varied"] for r in res["rows"]] == [{"data.fraction": 1.0}, {"data.fraction": 0.5}]
    head, _, first, second = res["table"].splitlines()[:4]
    assert head.startswith("| recipe | data.fraction | t2i R@1")
    assert first.startswith("| a | 1.0 |") and second.startswith("| b | 0.5 |")
    assert "fraction varies" in res["table"]
