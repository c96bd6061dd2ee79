"""Usage mistakes on the command line: each is refused with a message naming what to change, before
anything on disk changes (or, where the intent is clear, does what was meant)."""
import json

import pytest
import torch
import yaml

from finealign.cli import main
from finealign.config import ConfigError, load_config
from finealign.train.checkpoint import find_checkpoint, list_checkpoints

TINY = ["data.source=shapes", "data.num_samples=64", "data.batch_size=8", "train.warmup=1", "train.threads=2",
        "train.ckpt_every=0", "eval.max_images=16", "--no-progress"]


def train(tmp_path, name, *extra, recipe="clip"):
    run = tmp_path / name
    assert main(["train", recipe, *TINY, "train.steps=2", f"train.run_dir={run}", *extra]) == 0
    return run


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb" not in p.parts}


def test_a_new_run_into_a_run_dir_with_checkpoints_is_refused(tmp_path, capsys):
    run = train(tmp_path, "run")
    before = snapshot(run)
    assert main(["train", "clip", *TINY, "train.steps=3", f"train.run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints up to step_00000002)" in err and f"--resume {run}" in err
    assert snapshot(run) == before
    # a directory without checkpoints (a run that died before its first save) may be reused: its metrics
    # start afresh instead of continuing the dead run's rows
    (run / "checkpoints").rename(tmp_path / "moved")
    assert main(["train", "clip", *TINY, "train.steps=1", "train.log_every=1", f"train.run_dir={run}"]) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_continues_the_runs_own_config_not_the_recipes(tmp_path, capsys):
    """The run was trained on shapes with batch 8: `train clip --resume RUN` (and the README's
    `train clip train.run_dir=RUN --resume latest`) keeps that, where rebuilding from the recipe would
    switch to the recipe's data source and batch size."""
    run = train(tmp_path, "run")
    recipe = load_config("clip")
    assert (recipe.data.source, recipe.data.batch_size) != ("shapes", 8)
    assert main(["train", "clip", "--resume", str(run), "train.steps=3", "--no-progress"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["source"], saved["data"]["batch_size"], saved["train"]["steps"]) == ("shapes", 8, 3)
    assert main(["train", "clip", f"train.run_dir={run}", "--resume", "latest", "train.steps=4",
                 "--no-progress"]) == 0
    assert find_checkpoint(run).name == "step_00000004"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["source"], saved["data"]["batch_size"]) == ("shapes", 8)
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", "coca", "--resume", str(run), "train.steps=5", "--no-progress"]) == 2
    assert "was trained with recipe 'clip', not 'coca'" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_resume_that_changes_the_model_is_refused_before_config_yaml_changes(tmp_path, capsys):
    run = train(tmp_path, "run")
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "train.steps=3", "model.embed_dim=64", "--no-progress"]) == 2
    assert "model.embed_dim (128 -> 64) cannot change" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "train.steps=3", "--no-progress"]) == 0   # not stuck
    assert find_checkpoint(run).name == "step_00000003"


def test_a_resume_reads_the_checkpoints_tokenizer_when_the_runs_copy_is_gone(tmp_path):
    run = train(tmp_path, "run")
    original = json.loads((run / "tokenizer.json").read_text())
    (run / "tokenizer.json").unlink()
    # other captions (a BPE retrained on them would number the tokens differently)
    assert main(["train", "--resume", str(run), "train.steps=3", "data.num_samples=16", "data.seed=5",
                 "--no-progress"]) == 0
    assert json.loads((run / "tokenizer.json").read_text()) == original


def test_an_unavailable_device_is_a_config_error(tmp_path, capsys):
    assert main(["train", "clip", *TINY, "train.device=gpu", f"train.run_dir={tmp_path / 'a'}"]) == 2
    assert "train.device='gpu' is not a device: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "clip", *TINY, "train.device=cuda", f"train.run_dir={tmp_path / 'b'}"]) == 2
        assert "train.device=cuda but this machine has no cuda device" in capsys.readouterr().err


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from finealign.train import setup
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup.time, "strftime", lambda fmt: "20261124-120000")
    dirs = [setup.make_run_dir(load_config("clip"), None) for _ in range(3)]
    assert [d.name for d in dirs] == ["clip-20261124-120000", "clip-20261124-120000-2", "clip-20261124-120000-3"]
    assert all((d / "config.yaml").is_file() for d in dirs)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("train.lr=0", "train.lr must be > 0, got 0.0"),
    ("train.steps=-1", "train.steps must be >= 0, got -1"),
    ("data.workers=-1", "data.workers must be >= 0, got -1"),
    ("eval.max_images=-5", "eval.max_images must be >= 0, got -5"),
    ("data.num_samples=-1", "data.num_samples must be >= 0, got -1"),
    ("model.momentum=1", "model.momentum must be in [0, 1), got 1.0"),
    ("eval.top_p=0", "eval.top_p must be in (0, 1], got 0.0"),
    ("objectives.itc.weight=abc", "objectives.itc.weight must be a number, got 'abc'"),
    ("eval.tasks=[retrival]", "eval.tasks: unknown task 'retrival'; did you mean 'retrieval'?"),
    ("model=[1,2]", "model must be a mapping of model.* keys, got [1, 2]"),
    ("data.num_samples=5", "data.num_samples sizes a procedural source (shapes, shapes-items); "
                           "data.source=emoji reads its samples from files"),
])
def test_out_of_range_and_mistyped_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("clip", [override])
    assert message in str(e.value)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("usage"), "clip")


def test_eval_refuses_a_task_the_model_cannot_run_and_merges_task_results(clip_run, tmp_path, capsys):
    ck = find_checkpoint(clip_run)
    assert main(["eval", str(clip_run), "--task", "retrieval", "--no-progress"]) == 0
    out = ck / "eval_test.json"
    first = json.loads(out.read_text())
    assert "retrieval" in first and first["evaluated_on"]["max_images"] == 16
    assert main(["eval", str(clip_run), "--task", "caption", "--no-progress"]) == 2
    assert "--task caption: " in (err := capsys.readouterr().err) and "has no caption decoder" in err
    assert json.loads(out.read_text()) == first                 # the refused task wrote nothing
    assert main(["eval", str(clip_run), "--task", "classify", "--no-progress"]) == 0
    assert "kept its earlier retrieval results" in capsys.readouterr().out
    both = json.loads(out.read_text())
    assert both["retrieval"] == first["retrieval"] and "classify" in both
    # a task run again replaces its stored result (here a tampered one); the other is kept; train.seed is
    # an override eval takes
    both["retrieval"]["t2i_r1"] = -1.0
    out.write_text(json.dumps(both))
    assert main(["eval", str(clip_run), "--task", "retrieval", "train.seed=3", "--no-progress"]) == 0
    assert "kept its earlier classify results" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["retrieval"] == first["retrieval"] and again["classify"] == both["classify"]
    # other data: the earlier results are not mixed in
    assert main(["eval", str(clip_run), "--task", "classify", "eval.max_images=8", "--no-progress"]) == 0
    assert "retrieval" not in json.loads(out.read_text())
    # --out: a directory is refused before evaluating, a missing parent is created
    assert main(["eval", str(clip_run), "--task", "classify", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in capsys.readouterr().err
    target = tmp_path / "new" / "sub" / "res.json"
    assert main(["eval", str(clip_run), "--task", "classify", "--out", str(target), "--no-progress"]) == 0
    assert "classify" in json.loads(target.read_text())


def test_merging_keeps_the_caption_samples_with_a_kept_caption_result(tmp_path):
    from finealign.cli_infer import _merge_earlier
    on = {"split": "test", "source": "shapes", "root": "", "max_images": 0}
    out = tmp_path / "eval_test.json"
    out.write_text(json.dumps({"caption": {"cider": 1.5}, "samples": [{"key": "a"}], "retrieval": {"t2i_r1": 1.0},
                               "evaluated_on": on}))
    res = {"retrieval": {"t2i_r1": 2.0}, "evaluated_on": on}
    assert _merge_earlier(out, res) == ["caption"]
    assert res == {"retrieval": {"t2i_r1": 2.0}, "caption": {"cider": 1.5}, "samples": [{"key": "a"}],
                   "evaluated_on": on}
    fresh = {"caption": {"cider": 3.0}, "samples": [{"key": "b"}], "evaluated_on": on}
    assert _merge_earlier(out, fresh) == ["retrieval"] and fresh["samples"] == [{"key": "b"}]


def test_resume_edge_cases(tmp_path, capsys, monkeypatch):
    """A run without config.yaml resumes from its checkpoint's config; tokenizer.* and the optimizer's
    other restored keys are refused like model.*; a resume whose checkpoints all fail to load leaves
    config.yaml as it was; `--resume latest` needs train.run_dir; a run dir that is a file is refused."""
    run = train(tmp_path, "run")
    (run / "config.yaml").unlink()
    assert main(["train", "--resume", str(run), "train.steps=3", "--no-progress"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["source"], saved["data"]["batch_size"], saved["train"]["steps"]) == ("shapes", 8, 3)
    capsys.readouterr()
    for key, value in [("tokenizer.vocab_size", "999"), ("train.weight_decay", "0.5"), ("train.beta2", "0.9")]:
        assert main(["train", "--resume", str(run), "train.steps=4", f"{key}={value}", "--no-progress"]) == 2
        assert f"{key} (" in capsys.readouterr().err
    config = (run / "config.yaml").read_bytes()
    for state in run.glob("checkpoints/step_*/state.pt"):
        state.write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(run), "train.steps=5", "--no-progress"]) == 2
    assert (run / "config.yaml").read_bytes() == config
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "clip", "--resume", "latest", "--no-progress"]) == 2
    assert "--resume latest needs train.run_dir=DIR" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "afile").write_text("")
    assert main(["train", "clip", *TINY, "train.run_dir=afile"]) == 2
    assert "train.run_dir=afile is a file, not a directory" in capsys.readouterr().err


def test_a_dataset_dir_given_as_a_model_is_named_as_one(tmp_path, capsys):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "meta.json").write_text('{"font": "x"}')
    (ds / "train.jsonl").write_text("")
    assert main(["eval", str(ds), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not a run, checkpoint, export or Hugging Face CLIPModel directory" in err
    assert "looks like a dataset (pass it with --data" in err
    assert not list_checkpoints(ds)


@pytest.mark.parametrize("argv, message", [
    (["retrieve", "RUN", "--query", "a", "--images", "x", "-k", "-1"], "argument -k: must be >= 1, got -1"),
    (["caption", "RUN", "a.png", "--num", "0"], "argument --num: must be >= 1, got 0"),
    (["viz", "prototypes", "RUN", "--images", "x", "--top", "two"], "argument --top: expected an integer, got 'two'"),
    (["data", "shard", "--source", "shapes", "--split", "train", "--out", "x", "--maxcount", "0"],
     "argument --maxcount: must be >= 1, got 0"),
])
def test_numeric_options_are_checked_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_serve_checks_its_port_before_loading_anything(tmp_path, capsys):
    import socket
    pytest.importorskip("uvicorn")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the checkpoint and gallery do not exist: the port is what is reported, first
        assert main(["serve", str(tmp_path / "none"), "--gallery", str(tmp_path / "g"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    for bad in ("70000", "-1"):
        assert main(["serve", str(tmp_path / "none"), "--gallery", str(tmp_path / "g"), "--port", bad]) == 2
        assert f"--port {bad}: must be in 0..65535" in capsys.readouterr().err


def test_os_errors_are_one_line_errors(clip_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["export", str(clip_run), str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finealign export: error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_export_into_a_directory_holding_other_files_is_refused(clip_run, tmp_path, capsys):
    ds = tmp_path / "dataset"
    (ds / "images").mkdir(parents=True)
    (ds / "train.jsonl").write_text("{}\n")
    for force in ([], ["--force"]):
        assert main(["export", str(clip_run), str(ds), *force]) == 2
        assert "holds other files (images, train.jsonl): an export goes into a new or empty" in capsys.readouterr().err
    assert sorted(p.name for p in ds.iterdir()) == ["images", "train.jsonl"]
    assert main(["export", str(clip_run), str(tmp_path / "ex")]) == 0
    assert main(["export", str(clip_run), str(tmp_path / "ex"), "--force"]) == 0     # over an export


def test_an_unknown_recipe_names_the_closest_and_the_studies_briefly(capsys):
    assert main(["train", "cocaa"]) == 2
    err = capsys.readouterr().err
    assert "no recipe 'cocaa'; did you mean 'coca'?" in err and "ablations/sycoca/..." in err
    assert "ablations/sycoca/1-coca" not in err and "`finealign recipes` lists them all" in err


def test_data_mistakes_name_the_split_or_the_option(clip_run, tmp_path, capsys):
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    ds = tmp_path / "emoji"
    ds.mkdir()
    for split in ("train", "test"):
        (ds / f"{split}.jsonl").write_text("")
    cfg = load_config("clip", [f"data.root={ds}"]).data
    with pytest.raises(FileNotFoundError, match=r"no split 'validation' in the emoji dataset at .* its splits: "
                                                r"test, train\)"):
        build_source(cfg, "validation", SkipLog())
    with pytest.raises(FileNotFoundError, match="emoji dataset not found at .*; run `finealign data build emoji"):
        build_source(load_config("clip", [f"data.root={tmp_path / 'nothing'}"]).data, "test", SkipLog())
    # the run's data are generated (shapes): a dataset root has nothing to say
    assert main(["eval", str(clip_run), "--data", str(ds), "--task", "retrieval", "--no-progress"]) == 2
    assert "--data " + str(ds) + ": data.source=shapes is generated in memory" in capsys.readouterr().err


def test_maccap_runs_in_the_analysis_verbs(clip_run, tmp_path, capsys):
    """analyze gap measures a MacCap run's frozen backbone (its embeddings); viz masks / mix, which read
    the patch-text relevance the backbone was trained with, point to the backbone run."""
    run = tmp_path / "maccap"
    assert main(["train", "maccap", f"maccap.backbone={clip_run}", "data.num_samples=32", "data.batch_size=8",
                 "maccap.adaptor_width=32", "maccap.adaptor_heads=2", "maccap.queries=4", "maccap.copies=3",
                 "lm.width=32", "lm.layers=1", "lm.heads=2", "train.steps=1", f"train.run_dir={run}",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["analyze", "gap", str(run), "--out", str(tmp_path / "gap"), "--max-images", "16",
                 "--no-progress"]) == 0
    assert "is a MacCap run: the gap of its frozen backbone" in capsys.readouterr().out
    mine = json.loads((tmp_path / "gap" / "gap.json").read_text())
    assert main(["analyze", "gap", str(clip_run), "--out", str(tmp_path / "gap_bb"), "--max-images", "16",
                 "data.seed=1", "data.num_samples=32", "--no-progress"]) == 0   # the MacCap run's data
    backbone = json.loads((tmp_path / "gap_bb" / "gap.json").read_text())
    assert mine["n_pairs"] == backbone["n_pairs"] > 0
    assert mine["centred_var"] == pytest.approx(backbone["centred_var"])
    assert main(["viz", "masks", str(run), "--image", "x.png", "--text", "a", "--out", str(tmp_path / "m.png")]) == 2
    assert "is a MacCap run (a captioner trained over a frozen backbone)" in capsys.readouterr().err


def test_an_interrupted_export_overwrite_is_refused_on_load(clip_run, tmp_path, monkeypatch):
    """export --force over an earlier export, killed between two files: the directory holds the new
    weights beside the old config. Loading it must fail, naming the interruption, not read the mix."""
    import finealign
    from finealign.interop import export as E
    out = tmp_path / "ex"
    assert main(["export", str(clip_run), str(out)]) == 0
    real = E._write

    def dies_at_config(path, write):
        if path.name == "config.yaml":
            raise OSError(28, "No space left on device")
        real(path, write)
    monkeypatch.setattr(E, "_write", dies_at_config)
    assert main(["export", str(clip_run), str(out), "--force"]) == 2
    monkeypatch.setattr(E, "_write", real)
    with pytest.raises(E.ExportError, match="the export into it was interrupted .* --force` again"):
        finealign.load(out)
    assert main(["export", str(clip_run), str(out), "--force"]) == 0      # and the re-run repairs it
    assert finealign.load(out).config.model.arch == "coca"
