"""Usage mistakes, second round: shards, leftovers of failed runs, ablation reruns, recipe YAML and the
Python API. Each is refused with a message naming what to change before anything on disk changes, or
does what was meant."""
import json
import tarfile

import pytest
import yaml

from finealign.ablate import run_ablation
from finealign.cli import main
from finealign.config import CONFIG_DIR, ConfigError, load_config

from test_ablate import write_recipe

SHAPES = ["data.source=shapes", "data.num_samples=24"]


def members(shards):
    return sorted(m for s in shards for m in tarfile.open(s).getnames() if m.endswith(".txt"))


def test_data_shard_reshards_in_place_refuses_existing_and_bad_patterns(tmp_path, capsys):
    out = tmp_path / "sh"
    assert main(["data", "shard", "--source", "shapes", "--split", "val", "--out", str(out / "val-%06d.tar"),
                 "--maxcount", "4", *SHAPES]) == 0
    first = sorted(out.glob("val-*.tar"))
    assert len(first) > 1
    text = capsys.readouterr().out
    assert f"data.val={out}/val-{{000000..{len(first) - 1:06d}}}.tar" in text
    names = members(first)
    # the same pattern again: refused without --force, nothing touched
    before = {p: p.read_bytes() for p in first}
    assert main(["data", "shard", "--source", "shapes", "--split", "val", "--out", str(out / "val-%06d.tar"),
                 *SHAPES]) == 2
    assert f"already holds {len(first)} shard(s) matching val-%06d.tar" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in first} == before
    # re-shard those shards into themselves, fewer and larger: every sample survives, no stale shard left
    assert main(["data", "shard", "--source", "webdataset", "--root", str(out), "--split", "val",
                 "--out", str(out / "val-%06d.tar"), "--maxcount", "100", "--force"]) == 0
    assert sorted(out.glob("val-*.tar")) == [out / "val-000000.tar"]
    assert len(members([out / "val-000000.tar"])) == len(names)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]          # no temporary dir left
    for bad in ("v-%06d-%d.tar", "v-%s", "v-%06d"):
        assert main(["data", "shard", "--source", "shapes", "--split", "val", "--out", str(out / bad), *SHAPES]) == 2
        assert "a shard pattern is a file name with one integer field and the .tar suffix" in capsys.readouterr().err


def test_a_split_with_nothing_to_shard_or_tokenize_is_an_error_that_writes_nothing(tmp_path, capsys):
    ds = tmp_path / "empty"
    ds.mkdir()
    (ds / "train.jsonl").write_text("")
    assert main(["data", "shard", "--source", "jsonl", "--root", str(ds), "--split", "train",
                 "--out", str(tmp_path / "sh" / "train-%06d.tar")]) == 2
    assert "gave no sample to write (skipped: the split is empty); nothing written" in capsys.readouterr().err
    assert not list((tmp_path / "sh").glob("*.tar"))
    run = tmp_path / "run"
    assert main(["train", "clip", "data.source=jsonl", f"data.root={ds}", f"train.run_dir={run}",
                 "--no-progress"]) == 2
    assert "no training captions to build a tokenizer from" in capsys.readouterr().err
    assert not (run / "tokenizer.json").exists()


def test_a_new_run_does_not_reuse_a_failed_attempts_tokenizer(tmp_path):
    from finealign.data.tokenizer import Tokenizer
    run = tmp_path / "run"
    run.mkdir()
    Tokenizer.train(["zzz"], vocab_size=300).save(run / "tokenizer.json")       # left by a failed attempt
    assert main(["train", "clip", *SHAPES, "data.batch_size=8", "train.steps=1", f"train.run_dir={run}",
                 "--no-progress"]) == 0
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert "circle" in vocab or "Ġcircle" in vocab


@pytest.fixture(scope="module")
def clip_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "a_clip.yaml", "clip", ["retrieval"], "CLIP")
    out = root / "out"
    run_ablation(root / "recipes", seeds=1, out_dir=out, progress=False)
    return root, out


def test_ablate_reruns_evaluate_missing_tasks_and_refuse_what_cannot_run(clip_study, monkeypatch, tmp_path):
    root, out = clip_study
    ckpt = out / "a_clip" / "seed0" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    # a task the first run did not evaluate: evaluated from the final checkpoint, not retrained
    res = run_ablation(root / "recipes", seeds=1, out_dir=out, progress=False, tasks=["retrieval", "classify"])
    run = res["runs"][0]
    assert run["reused"] is False and run["results"]["timing"]["resumed_from_checkpoint"] is True
    assert {"retrieval", "classify"} <= set(run["results"]) and run["results"]["tasks_asked"] == ["retrieval", "classify"]
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert run_ablation(root / "recipes", seeds=1, out_dir=out, progress=False, tasks=["classify"])["runs"][0]["reused"]
    # the same --out spelled relative to another working directory: still the same runs
    monkeypatch.chdir(out.parent)
    assert run_ablation(root / "recipes", seeds=1, out_dir="out", progress=False)["runs"][0]["reused"]
    # captioning with a CLIP recipe: refused before anything trains
    with pytest.raises(ValueError, match="--task caption: recipe a_clip has no caption decoder"):
        run_ablation(root / "recipes", seeds=1, out_dir=tmp_path / "new", progress=False, tasks=["caption"])
    assert not (tmp_path / "new").exists()
    # another study into this --out: refused, the first study's table kept
    (tmp_path / "other").mkdir()
    write_recipe(tmp_path / "other" / "b_clip.yaml", "clip", ["retrieval"], "other")
    table = (out / "table.md").read_text()
    with pytest.raises(ValueError, match="holds the results of another study"):
        run_ablation(tmp_path / "other", seeds=1, out_dir=out, progress=False)
    assert (out / "table.md").read_text() == table


def test_recipe_yaml_and_api_mistakes(tmp_path, capsys, monkeypatch):
    dup = tmp_path / "dup.yaml"
    dup.write_text("base: clip\ntrain: {steps: 3}\nmodel: {preset: tiny}\ntrain: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML: key 'train' given twice"):
        load_config(str(dup))
    assert load_config("coca", ["objectives.ic=null"]).active_objectives() == {"itc": {"weight": 1.0}}
    assert load_config("coca", ["objectives.ic=0"]).active_objectives() == {"itc": {"weight": 1.0}}
    assert load_config(CONFIG_DIR / "coca.yaml").recipe == "coca"           # a Path recipe
    for bad in ("train.steps=5", ["train.steps=5", 5]):
        with pytest.raises(ConfigError, match="overrides must be a list of 'key=value' strings"):
            load_config("coca", bad)
    # train.run_dir=~/x is under the home directory, not a literal "~" folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "clip", *SHAPES, "data.batch_size=8", "train.steps=1", "train.run_dir=~/x",
                 "--no-progress"]) == 0
    assert (tmp_path / "home" / "x" / "checkpoints").is_dir() and not (tmp_path / "~").exists()
    assert yaml.safe_load((tmp_path / "home" / "x" / "config.yaml").read_text())["train"]["run_dir"] == \
        str(tmp_path / "home" / "x")
    # quickstart --data naming a file: refused before building anything
    (tmp_path / "afile").write_text("")
    assert main(["quickstart", "--data", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "--data " + str(tmp_path / "afile") + " is a file" in capsys.readouterr().err


def test_caption_num_needs_sampling_and_captions_from_needs_files(tmp_path, capsys):
    from PIL import Image
    run = tmp_path / "coca"
    assert main(["train", "coca", *SHAPES, "data.batch_size=8", "train.steps=1", f"train.run_dir={run}",
                 "--no-progress"]) == 0
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    capsys.readouterr()
    assert main(["caption", str(run), str(img), "--num", "2", "--decode", "greedy"]) == 2
    assert "--num 2: greedy decoding gives one caption per image" in capsys.readouterr().err
    assert main(["caption", str(run), str(img), "--num", "2", "--decode", "top_p"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["retrieve", str(run), "--image", str(img), "--captions-from", str(tmp_path)]) == 2
    assert "data.source=shapes is generated in memory" in capsys.readouterr().err


def test_two_studies_with_one_name_keep_their_own_charts(clip_study, tmp_path):
    import shutil
    from finealign.report import build_report
    _, out = clip_study
    twin = tmp_path / "elsewhere" / out.name
    shutil.copytree(out, twin)
    res = json.loads((twin / "results.json").read_text())
    for run in res["runs"]:
        run["results"]["retrieval"]["t2i_r1"] = 99.0     # tells the two charts apart
    for row in res["rows"]:
        row["metrics"]["t2i_r1"] = {"mean": 99.0, "std": 0.0, "n": 1, "values": [99.0]}
    (twin / "results.json").write_text(json.dumps(res))
    page = build_report([out, twin], tmp_path / "r.html", progress=False)
    bars = sorted((page.parent / "r_files").glob("*_bars.png"))
    assert len(bars) == 2 and bars[0].read_bytes() != bars[1].read_bytes()
    html = page.read_text()
    assert f"Ablation study: {out.parent.name}/{out.name}" in html and f"Ablation study: elsewhere/{out.name}" in html


def test_override_text_values_and_keys(tmp_path):
    from finealign.config import parse_overrides
    for sep in ("|", "#", ",", ";"):                 # YAML syntax characters meant as text
        assert parse_overrides([f"data.separator={sep}"]) == {"data": {"separator": sep}}
        assert load_config("clip", [f"data.separator={sep}"]).data.separator == sep
    assert parse_overrides(["objectives.ic=null"]) == {"objectives": {"ic": None}}
    for bad in (".train.steps=2", "train..steps=2"):
        with pytest.raises(ConfigError, match="has an empty part"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="invalid YAML value"):
        parse_overrides(["train.steps=!!python/object/apply:os.system ['true']"])


def test_a_trainer_keeps_the_callers_config_and_refuses_a_second_train(tmp_path, monkeypatch):
    from finealign.train.loop import Trainer
    monkeypatch.chdir(tmp_path)                        # the automatic run dir goes under ./runs
    cfg = load_config("clip", [*SHAPES, "data.batch_size=8", "train.steps=1", "train.warmup=0"])
    for seed in (0, 1):                                # one config object, two runs: two run dirs
        cfg.train.seed = seed
        cfg.train.run_dir = str(tmp_path / f"s{seed}") if seed else ""
        t = Trainer(cfg, progress=False)
        assert cfg.train.run_dir == ("" if not seed else str(tmp_path / "s1"))
        t.train()
    assert len(list((tmp_path / "runs").iterdir())) == 1 and (tmp_path / "s1" / "checkpoints").is_dir()
    with pytest.raises(RuntimeError, match="this Trainer has finished"):
        t.train()


def test_recipe_files_load_paths_and_a_missing_root(tmp_path, caplog, monkeypatch):
    import finealign
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty.yaml: the recipe is empty"):
        load_config(str(tmp_path / "empty.yaml"))
    (tmp_path / "child.yaml").write_text("base: nosuch\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base: no recipe 'nosuch'"):
        load_config(str(tmp_path / "child.yaml"))
    # load: the run's `latest` pointer file is followed; another file is named as one
    run = tmp_path / "run"
    assert main(["train", "clip", *SHAPES, "data.batch_size=8", "train.steps=1", f"train.run_dir={run}",
                 "--no-progress"]) == 0
    assert finealign.load(run / "checkpoints" / "latest").path.name == "step_00000001"
    with pytest.raises(FileNotFoundError, match=r"config.yaml is a file: give the run, checkpoint or export"):
        finealign.load(run / "config.yaml")
    # a data.root that does not exist, with the split file in the working directory: read, and said so
    (tmp_path / "train.csv").write_text("filepath,title\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("clip", ["data.source=csv", f"data.root={tmp_path / 'typo'}"]).data
    with caplog.at_level("WARNING", logger="finealign"):
        list(build_source(cfg, "train", SkipLog()))
    assert f"data.root={tmp_path / 'typo'} does not exist: reading split 'train' from train.csv" in caplog.text


def test_ablate_refuses_the_overrides_it_sets_and_viz_study_takes_the_directory(clip_study, tmp_path, capsys):
    root, out = clip_study
    for bad in ("train.seed=5", "train.run_dir=x"):
        with pytest.raises(ValueError, match=f"ablate sets train.seed .* drop {bad}"):
            run_ablation(root / "recipes", seeds=1, out_dir=tmp_path / "o", progress=False, overrides=[bad])
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file: an ablation writes a directory"):
        run_ablation(root / "recipes", seeds=1, out_dir=tmp_path / "afile", progress=False)
    assert "data: shapes (generated, splits" in (out / "table.md").read_text()    # no dataset root to name
    # the study directory is read (its results.json): this study varies nothing, which is what is reported
    assert main(["viz", "study", str(out), "--out", str(tmp_path / "s.png"), "--x", "train.lr"]) == 2
    assert "row 'a_clip' has no varied key 'train.lr'" in capsys.readouterr().err
