"""Exact checks (from a mutation audit) of what the other evaluation tests leave loose: retrieval's input
validation, top-k clipping, recall denominators and the ``mean_recall`` average, gradient-free scoring,
item-level (grouped) ranks; the Python side of ``score_captions`` (validation, tokenizer choice and its
fallback when Java fails, METEOR switch, CIDEr-D x 100 by hand); and the quickstart's report (chance line,
samples, overrides) with training and evaluation replaced by stand-ins (its real run: test_quickstart.py). Every expected number is
worked out by hand on tiny inputs."""
from __future__ import annotations

import json

import pytest
import torch

from finealign.eval.captioning import java_available, score_captions
from finealign.eval.retrieval import recall_metrics, retrieval_metrics, retrieval_ranks, topk_images

# ---------------------------------------------------------------- retrieval

# image_embed = identity, so image @ text.T == text.T: S[i, t] is text row t, column i
IMG = torch.eye(3)
TXT = torch.tensor([[0.9, 0.2, 0.1],      # caption 0 (image 0)
                    [0.3, 0.8, 0.5],      # caption 1 (image 1)
                    [0.6, 0.1, 0.4],      # caption 2 (image 2)
                    [0.2, 0.7, 0.0]])     # caption 3 (image 1)
T2I = torch.tensor([0, 1, 2, 1])


def test_ranks_recall_denominators_and_mean_over_the_reported_values():
    # i2t: img0 best own 0.9 > 0.3, 0.6, 0.2 -> 0; img1 best own 0.8 -> 0; img2 own 0.4 < 0.5 -> 1
    # t2i: c0 0.9 top -> 0; c1 0.8 top -> 0; c2 0.4 < 0.6 -> 1; c3 0.7 top -> 0
    i2t, t2i = retrieval_ranks(IMG, TXT, T2I)
    assert i2t.tolist() == [0, 0, 1] and t2i.tolist() == [0, 0, 1, 0]
    m = retrieval_metrics(IMG, TXT, T2I, ks=(1,))
    assert m == pytest.approx({"i2t_r1": 200 / 3, "t2i_r1": 75.0, "mean_recall": (200 / 3 + 75.0) / 2})
    # recall counts rank < k (0-based) and divides each direction by its own count
    r = recall_metrics(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 3, 3, 0]), ks=(1, 2))
    assert r == pytest.approx({"i2t_r1": 100 / 3, "i2t_r2": 200 / 3, "t2i_r1": 20.0, "t2i_r2": 60.0,
                               "mean_recall": (100 / 3 + 200 / 3 + 20 + 60) / 4})


def test_ranks_need_no_gradient_even_for_inputs_that_require_one():
    img, txt = IMG.clone().requires_grad_(), TXT.clone().requires_grad_()
    i2t, t2i = retrieval_ranks(img, txt, T2I, chunk=2)
    assert i2t.tolist() == [0, 0, 1] and t2i.tolist() == [0, 0, 1, 0]


def test_item_level_caption_counts_its_best_image_of_the_group():
    """Images 0 and 1 form item 7, image 2 item 9. Caption 1 (image 1) scores 0.3 / 0.8 / 0.5: its best
    correct image (0.8) is first -> rank 0; ranked from its *worst* correct one (0.3), image 2 would come
    ahead. Caption 2 (item 9) scores 0.6 / 0.1 / 0.4: the wrong image 0 beats it -> rank 1."""
    groups = torch.tensor([7, 7, 9])
    i2t, t2i = retrieval_ranks(IMG, TXT, T2I, image_groups=groups)
    assert t2i.tolist() == [0, 0, 1, 0]
    # image 2 (item 9): own caption 0.4, wrong captions 0.1, 0.5, 0.0 -> 1; items 7 see all their captions
    assert i2t.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="image_groups must have shape"):
        retrieval_ranks(IMG, TXT, T2I, image_groups=torch.tensor([7, 7]))


def test_input_and_argument_errors():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        retrieval_ranks(IMG, TXT, T2I, chunk=0)
    with pytest.raises(ValueError, match="sizes differ"):
        retrieval_ranks(IMG, TXT[:, :2], T2I)
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(IMG, TXT, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="ks must name"):
        recall_metrics(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), ks=())
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_images(IMG, TXT, 0)


def test_topk_images_best_first_and_clipped_to_the_image_count():
    top = topk_images(IMG, TXT, 10, chunk=3)                 # k clipped to I = 3
    assert top.tolist() == [[0, 1, 2], [1, 2, 0], [0, 2, 1], [1, 0, 2]]
    assert topk_images(IMG, TXT, 1).tolist() == [[0], [1], [0], [1]]


# ---------------------------------------------------------------- captioning

A_REF = "a red circle on white paper"
B_REF = "two blue squares under green trees"


def test_cider_hand_value_is_times_100():
    """CIDEr-D, two images with disjoint single references: every n-gram has IDF log(2/1) > 0; a caption
    equal to its reference has cosine 1 for n = 1..4 and no length penalty -> 10; a caption sharing no
    n-gram with its reference -> 0. Mean 5, reported x 100 = 500."""
    s = score_captions({"a": [A_REF], "b": [B_REF]}, {"a": A_REF, "b": "one yellow star near"},
                       meteor=False, tokenizer="simple")
    assert s["cider"] == pytest.approx(500.0, abs=1e-6)
    assert s["num"] == 2 and s["tokenizer"] == "simple" and s["meteor"] is None
    assert "METEOR skipped (meteor=False)" in s["notes"]


def test_caption_validation():
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({0: []}, {0: "x"}, meteor=False)
    with pytest.raises(ValueError, match="only strings"):
        score_captions({0: ["a cat", 3]}, {0: "a cat"}, meteor=False)
    with pytest.raises(ValueError, match="no captions"):
        score_captions({}, {}, meteor=False)
    with pytest.raises(ValueError, match="tokenizer must be"):
        score_captions({0: ["a cat"]}, {0: "a cat"}, meteor=False, tokenizer="spacy")


def test_simple_tokenizer_is_used_when_asked_even_with_java():
    s = score_captions({0: ["a cat"]}, {0: "a cat"}, meteor=False, tokenizer="simple")
    assert s["tokenizer"] == "simple"
    assert not any("PTBTokenizer" in n or "java not found" in n for n in s["notes"])


def test_without_java_auto_says_the_tokenizer_is_approximate(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    s = score_captions({0: ["a cat"]}, {0: "a cat"}, meteor=False)
    assert s["tokenizer"] == "simple"
    assert any(n.startswith("java not found on PATH: used a simple regex tokenizer") for n in s["notes"])


@pytest.fixture
def failing_java(monkeypatch, tmp_path):
    """A `java` on PATH that exits 1 at once: the PTB tokenizer (and METEOR) fail for real."""
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_available()


def test_failing_java_falls_back_under_auto_and_raises_under_ptb(failing_java):
    s = score_captions({0: ["the cat sat on the mat"]}, {0: "The cat sat on the mat."}, meteor=True)
    assert s["tokenizer"] == "simple" and s["bleu4"] == pytest.approx(100.0, abs=1e-4)
    assert any(n.startswith("PTBTokenizer failed") for n in s["notes"])
    assert s["meteor"] is None and any(n.startswith("METEOR failed") for n in s["notes"])
    with pytest.raises(RuntimeError, match="PTBTokenizer exited with 1"):
        score_captions({0: ["a cat"]}, {0: "a cat"}, meteor=False, tokenizer="ptb")


# ---------------------------------------------------------------- quickstart report


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """Training and evaluation replaced by stand-ins (the real run is test_quickstart.py's job)."""
    from finealign.eval import runner
    from finealign.train import loop
    seen = {}

    class FakeTrainer:
        def __init__(self, cfg, progress=True):
            seen["cfg"] = cfg
            self.model, self.tokenizer, self.device = None, None, "cpu"

        def train(self):
            (tmp_path / "run").mkdir(exist_ok=True)
            return str(tmp_path / "run")

    res = {"num_images": 40, "retrieval": {"t2i_r1": 12.5},
           "samples": [{"generated": f"gen {i}", "references": [f"ref {i}", f"other {i}"]} for i in range(10)]}
    monkeypatch.setattr(loop, "Trainer", FakeTrainer)
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: res)
    data = tmp_path / "emoji"
    data.mkdir()
    (data / "test.jsonl").write_text("")
    return seen, res, data


def test_quickstart_report_chance_line_samples_and_overrides(fake_run, tmp_path, capsys):
    from finealign.cli import main
    seen, res, data = fake_run
    rc = main(["quickstart", "--steps", "3", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress",
               "train.steps=5"])
    assert rc == 0
    cfg = seen["cfg"]
    assert cfg.train.steps == 5                              # explicit overrides come last and win
    assert cfg.data.root == str(data) and cfg.train.run_dir == str(tmp_path / "run")
    out = capsys.readouterr().out
    assert "building the emoji dataset" not in out           # test.jsonl exists: nothing built
    assert "chance: R@1 = 2.50, R@5 = 12.50, R@10 = 25.00" in out      # 100/40, 500/40, 1000/40
    assert "'gen 7'" in out and "'gen 8'" not in out           # the first 8 samples
    assert "'ref 0'" in out and "'other 0'" not in out         # with their first reference
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text()) == res
    main(["quickstart", "--steps", "3", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"])
    assert seen["cfg"].train.steps == 3


def test_quickstart_rejects_a_file_as_data_dir(fake_run, tmp_path, capsys):
    from finealign.cli import main
    seen = fake_run[0]
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["quickstart", "--data", str(f), "--no-progress"]) != 0
    assert "is a file: give the emoji dataset's directory" in capsys.readouterr().err
    assert "cfg" not in seen                                  # stopped before any training
