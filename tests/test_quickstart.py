"""The README's main job, shortened: quickstart builds the data, trains, evaluates and reports."""
import json
import os


from finealign.cli import main

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def test_quickstart_end_to_end(tmp_path, capsys):
    data = tmp_path / "emoji"
    run = tmp_path / "run"
    rc = main(["quickstart", "--steps", "3", "--data", str(data), "--out", str(run), "--no-progress",
               "eval.max_images=48", "data.batch_size=16", "eval.decode=greedy"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== results on 48 test images" in out
    assert "t2i_r1" in out and "cider" in out and "chance: R@1 = 2.08" in out
    assert f"run directory: {run}" in out
    res = json.loads((run / "eval_test.json").read_text())
    assert res["num_images"] == 48 and res["caption"]["spice"] is None
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    if os.path.exists(FONT):
        assert (data / "test.jsonl").exists() and "emoji" in out
    else:
        assert "Falling back to the procedural 'shapes' dataset" in out


def test_quickstart_falls_back_to_shapes_without_font(tmp_path, capsys, monkeypatch):
    from finealign.data.sources import emoji

    def no_font(*a, **k):
        raise FileNotFoundError("emoji font not found: install fonts-noto-color-emoji or pass --font PATH")
    monkeypatch.setattr(emoji, "build_emoji_dataset", no_font)
    rc = main(["quickstart", "--steps", "2", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
               "--no-progress", "eval.max_images=16", "data.batch_size=16", "eval.tasks=[retrieval]"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Falling back to the procedural 'shapes' dataset" in out
    assert "on shapes for 2 steps" in out
