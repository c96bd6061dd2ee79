"""Exact rules of the command line and ``finealign.load`` that earlier tests left loose (README, "Every verb
takes ``--help``"): every refused resume key (beta1 / eps too), the recipe named beside ``--resume`` (a
YAML path, a run without a recipe), ``--resume latest`` with the last ``train.run_dir``, a run config that
is not a mapping; eval's accepted / refused override sections, ``evaluated_on`` (split, source, root,
max_images) deciding whether results add up, ``--split``, ``--task vqa``; caption's ``--num``; retrieve's
ranking (scores worked out from the model's own embeddings) and its argument errors; ``load``'s pointer
file, ``which``, latest *valid* checkpoint, eval mode and its messages; ``make_run_dir`` / ``build_tokenizer``
details. One tiny CoCa run (2 steps, a checkpoint each step) is trained once and copied where changed.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import finealign
from finealign.cli import main
from finealign.config import ConfigError, from_dict
from finealign.train.checkpoint import find_checkpoint

TINY = ["data.source=shapes", "data.num_samples=32", "data.batch_size=8", "train.warmup=1", "train.threads=1",
        "train.ckpt_every=1", "eval.max_images=8", "model.preset=tiny", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = tmp_path_factory.mktemp("exact") / "coca"
    assert main(["train", "coca", *TINY, "train.steps=2", f"train.run_dir={r}"]) == 0
    return r


@pytest.fixture
def copy(run, tmp_path):
    c = tmp_path / "copy"
    shutil.copytree(run, c)
    return c


def snapshot(r):
    return {p.relative_to(r): p.read_bytes() for p in r.rglob("*") if p.is_file() and "tb" not in p.parts}


# ---------------------------------------------------------------- train --resume


@pytest.mark.parametrize("override, shown", [
    ("train.lr=0.001", "train.lr (0.0005 -> 0.001)"), ("train.weight_decay=0.2", "train.weight_decay (0.1 -> 0.2)"),
    ("train.beta1=0.8", "train.beta1 (0.9 -> 0.8)"), ("train.beta2=0.99", "train.beta2 (0.98 -> 0.99)"),
    ("train.eps=1e-8", "train.eps (1e-06 -> 1e-08)"), ("model.text_layers=1", "model.text_layers (2 -> 1)"),
    ("tokenizer.lowercase=false", "tokenizer.lowercase (True -> False)")])
def test_resume_refuses_each_fixed_key(run, override, shown, capsys):
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "train.steps=3", override, "--no-progress"]) == 2
    assert shown in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_takes_the_same_values_and_the_recipe_as_a_yaml_path(copy, capsys):
    """The run is finished (2 of 2 steps): an accepted resume trains nothing. Equal values spelled otherwise
    are not changes; `configs/coca.yaml` / `x/coca.yaml` name the run's recipe, `clip.yaml` does not."""
    assert main(["train", "--resume", str(copy), "train.eps=0.000001", "train.lr=5e-4", "model.text_layers=2",
                 "--no-progress"]) == 0
    for recipe in ("coca", "configs/coca.yaml", "/elsewhere/coca.yaml"):
        assert main(["train", recipe, "--resume", str(copy), "--no-progress"]) == 0, recipe
    assert yaml.safe_load((copy / "config.yaml").read_text())["data"]["strict"] is False
    assert main(["train", "--resume", str(copy), "--strict", "--no-progress"]) == 0      # data.strict=true
    assert yaml.safe_load((copy / "config.yaml").read_text())["data"]["strict"] is True
    capsys.readouterr()
    assert main(["train", "configs/clip.yaml", "--resume", str(copy), "--no-progress"]) == 2
    assert "was trained with recipe 'coca', not 'configs/clip.yaml'" in capsys.readouterr().err


def test_a_run_without_a_recipe_resumes_under_any_recipe_name(copy):
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["recipe"] = ""
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "clip", "--resume", str(copy), "--no-progress"]) == 0
    # the run continued with its own (CoCa) config, not the named recipe's
    assert yaml.safe_load((copy / "config.yaml").read_text())["model"]["arch"] == "coca"
    # a study recipe is the same recipe by its file name
    cfg["recipe"] = "ablations/sycoca/1-coca"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "/my/recipes/1-coca.yaml", "--resume", str(copy), "--no-progress"]) == 0


def test_a_run_without_config_yaml_resumes_from_its_checkpoints_config(copy):
    (copy / "config.yaml").unlink()
    assert main(["train", "--resume", str(copy), "--no-progress"]) == 0
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert (saved["model"]["preset"], saved["data"]["num_samples"]) == ("tiny", 32)


def test_resume_latest_takes_the_last_run_dir_given(copy, tmp_path, capsys):
    assert main(["train", "--resume", "latest", f"train.run_dir={tmp_path / 'none'}", f"train.run_dir={copy}",
                 "--no-progress"]) == 0
    assert not (tmp_path / "none").exists()
    assert main(["train", "--resume", "latest", f"train.run_dir={copy}", f"train.run_dir={tmp_path / 'none'}",
                 "--no-progress"]) == 2
    assert "holds no config.yaml or checkpoint to continue" in capsys.readouterr().err


def test_resume_with_a_run_dir_override_continues_there(copy, tmp_path):
    """`--resume CKPT train.run_dir=NEW` continues the checkpoint in NEW (a fork), leaving the run as it was."""
    before = snapshot(copy)
    fork = tmp_path / "fork"
    assert main(["train", "--resume", str(copy / "checkpoints" / "step_00000001"), f"train.run_dir={fork}",
                 "--no-progress"]) == 0
    assert find_checkpoint(fork).name == "step_00000002" and snapshot(copy) == before
    assert yaml.safe_load((fork / "config.yaml").read_text())["train"]["run_dir"] == str(fork)


def test_an_option_like_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "coca", "--steps=3"])
    assert e.value.code == 2 and "unrecognized arguments: --steps=3" in capsys.readouterr().err


def test_a_run_config_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    r = tmp_path / "r"
    r.mkdir()
    (r / "config.yaml").write_text("- 1\n- 2\n")
    assert main(["train", "--resume", str(r), "--no-progress"]) == 2
    assert "config.yaml: not a run's config (a mapping), got list" in capsys.readouterr().err
    (r / "config.yaml").write_text("a: [1\n")
    assert main(["train", "--resume", str(r), "--no-progress"]) == 2
    assert "config.yaml: invalid YAML" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty), "--no-progress"]) == 2
    assert f"--resume {empty}: {empty} holds no config.yaml or checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- eval


def test_eval_refuses_every_section_but_its_own(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--task", "retrieval", "tokenizer.vocab_size=5", "lm.width=4", "train.lr=1",
                 "masking.ic.ratio=0.5", "--out", str(out), "--no-progress"]) == 2
    assert "lm.*, masking.*, tokenizer.*, train.lr cannot change for a trained model" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "retrieval", "maccap.samples=2", "--out", str(out),
                 "--no-progress"]) == 2
    assert "maccap.* overrides apply to MacCap runs" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "vqa", "--out", str(out), "--no-progress"]) == 2
    assert "--task vqa: " in (err := capsys.readouterr().err) and "cannot answer questions" in err
    assert not out.exists()


def test_eval_results_add_up_only_on_the_same_data(copy, tmp_path, capsys):
    ck = find_checkpoint(copy)
    assert main(["eval", str(copy), "--task", "retrieval", "--split", "val", "--no-progress"]) == 0
    res = json.loads((ck / "eval_val.json").read_text())
    assert res["evaluated_on"] == {"split": "val", "source": "shapes", "root": "data/emoji", "max_images": 8}
    assert not (ck / "eval_test.json").exists()
    out = tmp_path / "e.json"
    base = ["eval", str(copy), "--out", str(out), "--no-progress"]
    for changed in (["--split", "val"], ["--source", "shapes-items"], ["data.root=/elsewhere"]):
        assert main([*base, "--task", "retrieval"]) == 0
        assert main([*base, "--task", "classify", *changed]) == 0
        got = json.loads(out.read_text())
        assert "retrieval" not in got and "classify" in got, changed
    on = got["evaluated_on"]
    assert (on["source"], on["root"]) == ("shapes", "/elsewhere")
    assert main([*base, "--task", "retrieval", "--source", "shapes-items"]) == 0
    assert json.loads(out.read_text())["evaluated_on"]["source"] == "shapes-items"
    capsys.readouterr()
    assert main([*base, "--task", "classify", "--source", "shapes-items", "train.seed=4", "eval.temperature=0.5"]) == 0
    assert "kept its earlier retrieval results" in capsys.readouterr().out


# ---------------------------------------------------------------- caption / retrieve


def pngs(where, colours, suffix=".png"):
    where.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, c in enumerate(colours):
        paths.append(where / f"{i}_{c}{suffix}")
        Image.new("RGB", (40, 40), c).save(paths[-1], format="PNG")
    return paths


def test_caption_num(run, tmp_path, capsys):
    paths = [str(p) for p in pngs(tmp_path, ["red", "blue"])]
    assert main(["caption", str(run), *paths, "--num", "2", "--decode", "greedy"]) == 2
    assert "--num 2: greedy decoding gives one caption per image" in capsys.readouterr().err
    assert main(["caption", str(run), *paths, "--num", "2", "--decode", "top_p", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths * 2
    assert main(["caption", str(run), *paths, "--zero-shot"]) == 2
    assert "--zero-shot needs a MacCap run" in capsys.readouterr().err


def _embed_images(loaded, paths):
    from finealign.data.transforms import ImageTransform
    tf = ImageTransform(loaded.config.model.image_size, train=False)
    with torch.no_grad():
        return loaded.model.encode_image(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))["embed"]


def _embed_texts(loaded, texts):
    from finealign.eval.runner import embed_texts
    with torch.no_grad():
        return embed_texts(loaded.model, loaded.tokenizer, texts, loaded.config.model.context_length, "cpu")


def test_retrieve_ranks_by_the_models_similarity(run, tmp_path, capsys):
    gallery = tmp_path / "g"
    paths = pngs(gallery, ["red", "blue", "green"]) + pngs(gallery / "x", ["white"], ".PNG")
    (gallery / "x" / "notes.txt").write_text("not an image")
    shutil.move(paths[-1], gallery / "3_white.PNG")
    paths[-1] = gallery / "3_white.PNG"
    loaded = finealign.load(run)
    scores = (_embed_texts(loaded, ["a red circle"]) @ _embed_images(loaded, paths).t())[0]
    order = scores.argsort(descending=True).tolist()
    assert main(["retrieve", str(run), "--query", "a red circle", "--images", str(gallery), "-k", "3"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [p for _, p in lines] == [str(paths[i]) for i in order[:3]]
    assert [float(s) for s, _ in lines] == pytest.approx([float(scores[i]) for i in order[:3]], abs=2e-3)
    assert main(["retrieve", str(run), "--query", "a red circle", "--images", str(gallery), "-k", "9"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4          # the .PNG too, not notes.txt


def test_retrieve_captions_for_an_image(run, tmp_path, capsys):
    from finealign.data.loader import build_source
    from finealign.data.skips import SkipLog
    loaded = finealign.load(run)
    texts = sorted({c for s in build_source(loaded.config.data, "test", SkipLog()) for c in s.captions})
    img = pngs(tmp_path, ["red"])[0]
    scores = (_embed_images(loaded, [img]) @ _embed_texts(loaded, texts).t())[0]
    order = scores.argsort(descending=True).tolist()
    assert main(["retrieve", str(run), "--image", str(img), "-k", "3"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [t for _, t in lines] == [texts[i] for i in order[:3]]
    assert main(["retrieve", str(run), "--image", str(img), "-k", str(len(texts) + 5)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(texts)
    assert main(["retrieve", str(run), "--image", str(img), "--captions-from", str(tmp_path)]) == 2
    assert "this model's data.source=shapes is generated in memory" in capsys.readouterr().err
    assert main(["retrieve", str(run), "--query", "a red circle"]) == 2
    assert "--query needs --images DIR" in capsys.readouterr().err
    assert main(["retrieve", str(run)]) == 2
    assert "give --query TEXT --images DIR, or --image PATH" in capsys.readouterr().err
    assert main(["retrieve", str(run), "--query", "a", "--images", str(tmp_path / "none")]) == 2
    assert "no images found in" in capsys.readouterr().err


# ---------------------------------------------------------------- finealign.load


def test_load_resolves_pointer_step_and_latest_valid(run, copy):
    latest = finealign.load(run)
    assert latest.path == run / "checkpoints" / "step_00000002" and latest.model.training is False
    assert finealign.load(run / "checkpoints" / "latest").path.name == "step_00000002"
    assert finealign.load(run, which="1").path.name == "step_00000001"
    (copy / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"torn")
    assert finealign.load(copy).path.name == "step_00000001"


def test_load_names_what_it_was_given(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml is a file: give the run, checkpoint or export"):
        finealign.load(run / "config.yaml")
    r = tmp_path / "r"
    r.mkdir()
    with pytest.raises(FileNotFoundError, match="it holds nothing"):
        finealign.load(r)
    (r / "config.yaml").write_text("{}")
    (r / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="a run that has saved no checkpoint yet"):
        finealign.load(r)


# ---------------------------------------------------------------- train/setup.py


def test_make_run_dir_details(run, tmp_path, monkeypatch):
    from finealign.train import setup
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg.train.run_dir = ""
    # a resume from a checkpoint dir without train.run_dir continues in that checkpoint's run; nothing written
    before = snapshot(run)
    assert setup.make_run_dir(cfg, str(run / "checkpoints" / "step_00000001")) == run
    assert snapshot(run) == before
    # a nested recipe name gives one directory under runs/; a new run drops a stale tokenizer
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup.time, "strftime", lambda fmt: "20260101-000000")
    cfg.train.run_dir, cfg.recipe = "", "ablations/sycoca/1-coca"
    assert setup.make_run_dir(cfg, None) == Path("runs/ablations-sycoca-1-coca-20260101-000000")
    assert (tmp_path / "runs" / "ablations-sycoca-1-coca-20260101-000000" / "config.yaml").is_file()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}")
    cfg.train.run_dir = str(stale)
    assert setup.make_run_dir(cfg, None) == stale
    assert not (stale / "tokenizer.json").exists() and (stale / "config.yaml").is_file()


def test_build_tokenizer_prefers_tokenizer_path_and_needs_captions(run, tmp_path):
    from finealign.data.skips import SkipLog
    from finealign.data.tokenizer import Tokenizer
    from finealign.train import setup
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    other = tmp_path / "other"
    other.mkdir()
    Tokenizer.train(["zebra quokka"] * 5, vocab_size=300, lowercase=True).save(other / "tokenizer.json")
    cfg.tokenizer.path = str(run / "tokenizer.json")
    tok = setup.build_tokenizer(cfg, other, SkipLog())
    assert tok.vocab_size == Tokenizer.load(run / "tokenizer.json").vocab_size != \
        Tokenizer.load(other / "tokenizer.json").vocab_size
    empty = tmp_path / "emoji"                     # a dataset whose train split holds no samples
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    cfg.tokenizer.path, cfg.data.source, cfg.data.root = "", "emoji", str(empty)
    with pytest.raises(ValueError, match="no training captions to build a tokenizer from"):
        setup.build_tokenizer(cfg, tmp_path, SkipLog())


def test_pick_device(monkeypatch):
    from finealign.train.setup import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda:1 but this machine has no cuda device"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)      # one GPU per torchrun process
