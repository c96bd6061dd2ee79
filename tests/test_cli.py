"""The command line as a user runs it: every verb's --help, train/eval/caption/retrieve, clear errors."""
import json

import pytest
from PIL import Image

from finealign.cli import build_parser, main

VERBS = ["data", "train", "eval", "caption", "retrieve", "quickstart", "ablate", "viz", "recipes", "analyze",
         "export", "serve", "report"]


@pytest.mark.parametrize("verb", VERBS)
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: finealign" in capsys.readouterr().out


def test_parser_lists_all_verbs():
    from finealign.cli import VERBS as dispatched
    assert sorted(VERBS) == sorted(dispatched)              # this list is every verb main() dispatches
    help_text = build_parser().format_help()
    for verb in VERBS:
        assert verb in help_text


def test_bad_key_is_a_clear_error(capsys):
    assert main(["train", "coca", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stpes'; did you mean 'train.steps'?" in err


def test_unknown_recipe_is_a_clear_error(capsys):
    assert main(["train", "cocoa"]) == 2
    assert "no recipe 'cocoa'; did you mean 'coca'?" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rc = main(["train", "coca", "data.source=shapes", "data.num_samples=128", "data.batch_size=16",
               "train.steps=4", "train.ckpt_every=2", "train.log_every=1", f"train.run_dir={run}",
               "eval.temperature=0.0001", "--no-progress"])
    assert rc == 0
    return run


def test_train_writes_run_dir(trained_run):
    assert (trained_run / "config.yaml").exists()
    assert (trained_run / "tokenizer.json").exists()
    assert (trained_run / "tb").is_dir()
    steps = [json.loads(l)["step"] for l in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000002", "step_00000004"]


def test_eval_prints_table_and_writes_json(trained_run, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", str(trained_run), "--task", "retrieval", "--task", "classify", "--no-progress",
                 "--out", str(out), "eval.max_images=32"]) == 0
    text = capsys.readouterr().out
    assert "t2i_r1" in text and "top1" in text
    res = json.loads(out.read_text())
    assert res["num_images"] == 32 and 0 <= res["retrieval"]["mean_recall"] <= 100


def test_eval_refuses_overrides_a_trained_model_cannot_take(trained_run, capsys):
    """model.*, masking.*, objectives.* and train.* other than the seed were accepted and ignored (the model
    comes from the checkpoint's config): now exit 2 naming them."""
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--task", "retrieval", "model.context_length=8",
                 "train.precision=bf16", "objectives.itc.weight=2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.*, objectives.*, train.precision cannot change for a trained model" in err


def test_caption_and_retrieve(trained_run, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, c in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (48, 48), c).save(gallery / f"{i}_{c}.png")
    assert main(["caption", str(trained_run), str(gallery / "0_red.png"), "--decode", "greedy"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    path, caption = line.split("\t")
    assert path.endswith("0_red.png") and isinstance(caption, str)
    assert main(["retrieve", str(trained_run), "--query", "a red circle", "--images", str(gallery), "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(".png" in l for l in lines)
    # a glob, absolute (pathlib's Path().glob refuses those) or relative to the working directory
    assert main(["retrieve", str(trained_run), "--query", "a red circle", "--images", str(gallery / "*_[rg]*.png"),
                 "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(l.split("\t")[1] for l in lines) == [str(gallery / "0_red.png"), str(gallery / "2_green.png")]


def test_caption_samples_at_the_runs_eval_temperature(trained_run, tmp_path, capsys):
    """`caption --decode top_p` samples at the run's eval.temperature (1e-4 here: the argmax token every
    step, i.e. greedy decoding), as `eval` does."""
    paths = []
    for i, c in enumerate(["red", "blue", "green", "yellow"]):
        paths.append(str(tmp_path / f"{i}_{c}.png"))
        Image.new("RGB", (48, 48), c).save(paths[-1])
    capsys.readouterr()
    assert main(["caption", str(trained_run), *paths, "--decode", "greedy"]) == 0
    greedy = capsys.readouterr().out.strip().splitlines()
    assert main(["caption", str(trained_run), *paths, "--decode", "top_p"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == greedy


def test_caption_rejects_unreadable_image(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["caption", str(trained_run), str(bad)]) == 2
    assert "bad.png: cannot read image" in capsys.readouterr().err


def test_eval_missing_checkpoint_is_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_viz_masks_writes_png(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "sycoca", "data.source=shapes", "data.num_samples=64", "data.batch_size=16",
                 "train.steps=2", f"train.run_dir={run}", "--no-progress"]) == 0
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(img)
    out = tmp_path / "m.png"
    assert main(["viz", "masks", str(run), "--image", str(img), "--text", "a red circle", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 3 * im.size[1]        # five panels side by side


def test_category_recognition_uses_categories(trained_run):
    import finealign
    from finealign.config import from_dict, merge
    from finealign.eval.runner import evaluate
    from finealign.types import Sample
    loaded = finealign.load(trained_run)
    colours = ["red", "blue", "green", "white", "black", "yellow"]
    samples = [Sample(key=c, load_image=lambda c=c: Image.new("RGB", (32, 32), c), captions=[f"a {c} square"],
                      label=["warm", "cool"][i % 2], category=["x", "y", "z"][i % 3])
               for i, c in enumerate(colours)]
    by_label = evaluate(loaded.model, loaded.tokenizer, loaded.config, tasks=["classify"], samples=samples,
                        progress=False)["classify"]
    cfg = from_dict(merge(loaded.config.to_dict(), {"eval": {"classify_by": "category"}}))
    by_cat = evaluate(loaded.model, loaded.tokenizer, cfg, tasks=["classify"], samples=samples,
                      progress=False)["classify"]
    assert (by_label["num_classes"], by_label["by"]) == (2, "label")
    assert (by_cat["num_classes"], by_cat["by"]) == (3, "category")
