"""Hand-worked checks of caption decoding (greedy / beam / top-p), the tokenizer's layout and decode rules,
and the image transform's crop, normalisation and jitter. Every expectation below is computed by hand."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from finealign.data.tokenizer import Tokenizer
from finealign.data.transforms import (ImageTransform, _brightness, _contrast, normalize,
                                       random_resized_crop_box)
from finealign.models.generation import generate

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5                              # V = 6


class TableCaptioner:
    """Weightless captioner for ``generate(..., use_cache=False)``: each image is a row id (its pixel value),
    passed through as the memory; the next-token distribution over (EOS, A, B, C) is looked up in
    ``tables[row id]`` by the decoded prefix (uniform when absent). PAD / BOS get logit 0 (generate bans them)."""

    def __init__(self, tables, context_length: int = 16):
        self.tables = tables
        self.decoder = self._decode
        self.text = type("Text", (), {"context_length": context_length,
                                      "encode_tokens": staticmethod(lambda seqs: seqs)})()

    def encode_image(self, images):
        return {"memory": images[:, :1, :1, 0]}                         # (B, 1, 1): the row id

    def _decode(self, seqs, memory):
        out = torch.zeros(seqs.shape[0], 6)
        for r, s in enumerate(seqs.tolist()):
            table = self.tables[int(memory[r, 0, 0].item())]
            out[r, 2:] = torch.tensor(table.get(tuple(s), [.25] * 4)).log()
        return out[:, None].expand(-1, seqs.shape[1], -1)


def _images(*row_ids):
    return torch.tensor(row_ids, dtype=torch.float)[:, None, None, None].expand(-1, 3, 2, 2).clone()


# ---------------------------------------------------------------- greedy


def test_greedy_stops_each_row_at_its_own_eos_then_pads_and_trims_to_the_longest():
    """Row 0 says EOS at once (but would say A afterwards); row 1 says A, A, EOS. Row 0 must stay PAD after
    its EOS while row 1 goes on, and decoding stops once both ended: width 1 + 3, not 1 + max_new_tokens."""
    after = [.01, .97, .01, .01]                                        # prefers A
    row0 = {(BOS,): [.9, .05, .03, .02], (BOS, EOS): after, (BOS, EOS, PAD): after, (BOS, EOS, PAD, PAD): after}
    row1 = {(BOS,): [.1, .8, .05, .05], (BOS, A): [.2, .7, .05, .05], (BOS, A, A): [.9, .05, .03, .02]}
    out = generate(TableCaptioner({0: row0, 1: row1}), _images(0, 1), BOS, EOS, PAD, max_new_tokens=6,
                   use_cache=False)
    assert out.tolist() == [[BOS, EOS, PAD, PAD], [BOS, A, A, EOS]]


def test_generation_length_is_capped_by_the_context_length():
    """max_new_tokens larger than the text context: at most context_length - 1 new tokens (L = context)."""
    a_first = [.01, .97, .01, .01]
    lm = TableCaptioner({0: {(BOS,): a_first, (BOS, A): a_first, (BOS, A, A): a_first}}, context_length=4)
    for strategy in ("greedy", "beam"):
        out = generate(lm, _images(0), BOS, EOS, PAD, strategy=strategy, max_new_tokens=10, beam_size=2,
                       use_cache=False)
        assert out.shape == (1, 4) and out.tolist() == [[BOS, A, A, A]], strategy


# ---------------------------------------------------------------- beam search


def test_beam_final_pick_divides_by_length():
    """K = 2. Step 1: [A] (log p -0.5) and [EOS] (-1.0, finished). Step 2 from [A]: [A EOS] = -0.5 + log .55
    = -1.098 (norm -0.549); [A x] = -0.5 + log .15 = -2.397 (norm -1.199) for x in A, B, C; the finished
    [EOS] keeps -1.0 / 1. The kept beams [A EOS] and [EOS] are both finished, so the search stops (width 3).
    The final pick is length-normalised: [A EOS] (-0.549) beats [EOS] (-1.0), although its raw sum
    (-1.098) is lower. A finished beam also keeps its length: had [EOS PAD] counted 2 tokens (-0.5) it
    would have won."""
    e1, e5 = math.exp(-1.0), math.exp(-0.5)
    rest = (1 - e1 - e5) / 2
    table = {(BOS,): [e1, e5, rest, rest], (BOS, A): [.55, .15, .15, .15]}
    out = generate(TableCaptioner({0: table}), _images(0), BOS, EOS, PAD, strategy="beam", beam_size=2,
                   max_new_tokens=5, use_cache=False)
    assert out.tolist() == [[BOS, A, EOS]]
    assert (math.log(.55) - 0.5) / 2 > -1.0 > math.log(.55) - 0.5      # normalised vs raw ranking disagree


def test_finished_beam_keeps_its_score_for_free_and_follows_its_row():
    """K = 2. Step 1: [EOS] = log .5 = -0.693 (finished) ranks first, [A] = log .45 = -0.799 second.
    Step 2: [A B] = -0.799 + log .96 = -0.840 (norm -0.420) first, the finished [EOS] (still -0.693 / 1)
    second: the beams swap rows, and the finished flag must follow [EOS] to its new row.
    Step 3 (max_new_tokens = 3): [A B EOS] = -0.840 + log .28 = -2.113 (norm -0.704) is the best extension,
    but [EOS PAD PAD] keeps -0.693 / 1 (PAD is free, the length stays 1) and wins: BOS EOS PAD PAD.
    Were PAD to cost even 0.1 per step, [EOS] would fall to -0.893 and lose."""
    table = {(BOS,): [.5, .45, .025, .025],
             (BOS, A): [.02, .01, .96, .01],
             (BOS, A, B): [.28, .26, .24, .22]}
    out = generate(TableCaptioner({0: table}), _images(0, 0), BOS, EOS, PAD, strategy="beam", beam_size=2,
                   max_new_tokens=3, use_cache=False)
    assert out.tolist() == [[BOS, EOS, PAD, PAD]] * 2
    a_b_eos = math.log(.45) + math.log(.96) + math.log(.28)
    assert math.log(.5) > a_b_eos / 3 > math.log(.5) - 0.2


# ---------------------------------------------------------------- top-p


def _top_p_draws(probs, top_p, n=400, seed=0):
    row = torch.cat([torch.tensor(probs).log(), torch.zeros(2)])        # ids 0..3, then PAD 4, BOS 5 (banned)
    lm = TableCaptioner({0: {}})
    lm._decode = lambda seqs, memory: row.expand(seqs.shape[0], seqs.shape[1], -1).clone()
    lm.decoder = lm._decode
    out = generate(lm, _images(*([0] * n)), 5, 0, 4, strategy="top_p", top_p=top_p, max_new_tokens=1,
                   use_cache=False, generator=torch.Generator().manual_seed(seed))
    return set(out[:, 1].tolist())


def test_top_p_keeps_the_token_that_crosses_p():
    """Probabilities (EOS=0) .1, (1) .6, (2) .25, (3) .05. Sorted: .6, .25, .1, .05 (cumulative .6, .85, .95).
    p = .65: .6 alone falls short, so token 2 (which crosses p) joins: {1, 2}. p = .9: {1, 2, 0}.
    p = .5: the top token alone reaches p: {1}."""
    probs = [.1, .6, .25, .05]
    assert _top_p_draws(probs, 0.65) == {1, 2}
    assert _top_p_draws(probs, 0.9) == {0, 1, 2}
    assert _top_p_draws(probs, 0.5) == {1}


# ---------------------------------------------------------------- tokenizer


def _word_level(tmp_path, **configure):
    """A foreign word-level tokenizer.json whose [PAD] / [CLS] / [SEP] are plain vocabulary entries (not
    marked special), optionally saved with its own padding / truncation switched on."""
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "red": 4, "circle": 5, "blue": 6}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    if "truncation" in configure:
        hf.enable_truncation(max_length=configure["truncation"])
    if "padding" in configure:
        hf.enable_padding(pad_id=0, pad_token="[PAD]", length=configure["padding"])
    path = tmp_path / "word.json"
    hf.save(str(path))
    return Tokenizer.load(path)


def test_decode_skips_pad_even_when_the_tokenizer_json_does_not_mark_it_special(tmp_path):
    t = _word_level(tmp_path)
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
    assert t.decode([1, 4, 0, 5, 0, 2, 6]) == "red circle"               # BOS dropped, PADs skipped, stop at EOS
    assert t.decode([4, -1, 99, 5]) == "red circle"                      # out-of-range ids are skipped


def test_tokenizer_json_padding_and_truncation_are_ignored(tmp_path):
    """A tokenizer.json saved with its own truncation (2 tokens) or padding (to 5) must not change the layout
    [BOS, tokens, EOS, PAD...]: finealign truncates to the context itself."""
    for cfg in (dict(truncation=2), dict(padding=5)):
        t = _word_level(tmp_path, **cfg)
        ids, mask = t.encode_batch(["red circle blue", "blue"], 7)
        assert ids.tolist() == [[1, 4, 5, 6, 2, 0, 0], [1, 6, 2, 0, 0, 0, 0]], cfg
        assert mask.sum(1).tolist() == [5, 3], cfg


def test_lowercase_false_keeps_case_and_mask_id_is_the_mask_token():
    texts = ["Red Circle", "a Blue square", "red circle"] * 3
    cased = Tokenizer.train(texts, vocab_size=300, lowercase=False)
    assert cased.decode(cased.encode("Red Circle", 12)[0]) == "Red Circle"
    lower = Tokenizer.train(texts, vocab_size=300)
    assert lower.decode(lower.encode("Red Circle", 12)[0]) == "red circle"
    assert (lower.mask_id, lower.hf.token_to_id("<unk>")) == (4, 3)      # <mask>, not <unk>


# ---------------------------------------------------------------- image transform


def test_eval_transform_values_are_clip_normalised_by_hand():
    """A constant 4x4 image (255, 0, 51) at S = 4: every pixel is ((v / 255) - mean) / std per channel:
    (1 - .48145466) / .26862954 = 1.930335, (0 - .4578275) / .26130258 = -1.752100,
    (.2 - .40821073) / .27577711 = -0.755003."""
    img = Image.new("RGB", (4, 4), (255, 0, 51))
    x = ImageTransform(4, train=False)(img)
    want = torch.tensor([1.930335, -1.752100, -0.755003])[:, None, None].expand(3, 4, 4)
    assert torch.allclose(x, want, atol=1e-5)


def test_eval_crop_is_centred():
    """A 6x4 image with red first / last columns: the eval crop at S = 4 is columns 1..4 (box (1, 0, 5, 4), a
    same-size bicubic resample, hence exact), with no red; rng changes nothing at eval."""
    a = np.zeros((4, 6, 3), np.uint8)
    a[:, [0, 5]] = (255, 0, 0)
    a[:, 1:5] = (10, 20, 30)
    a[0, 2] = (200, 100, 50)
    t = ImageTransform(4, train=False)
    want = normalize(torch.from_numpy(a[:, 1:5].copy()).permute(2, 0, 1).float() / 255)
    for rng in (0, 1, random.Random(5)):
        assert torch.allclose(t(Image.fromarray(a), rng), want, atol=1e-5)


def test_random_crop_fallback_is_centred_and_ratio_clamped():
    """100x4 (and 4x100): no sampled box fits (its short side is >= 14), so the fallback keeps the short side
    and clamps the ratio to 4/3: 5 x 4, centred at (100 - 5) // 2 = 47."""
    assert random_resized_crop_box(100, 4, random.Random(0)) == (47, 0, 52, 4)
    assert random_resized_crop_box(4, 100, random.Random(0)) == (0, 47, 4, 52)


def test_contrast_blends_with_luma_mean_and_brightness_clamps():
    x = torch.zeros(3, 2, 2)
    x[0] = 1.0                                                           # pure red: luma 0.299
    y = _contrast(x.clone(), 0.5)
    assert torch.allclose(y[0], torch.full((2, 2), 0.5 + 0.5 * 0.299))
    assert torch.allclose(y[1:], torch.full((2, 2, 2), 0.5 * 0.299))
    assert torch.equal(_brightness(torch.full((3, 2, 2), 0.8), 1.5), torch.ones(3, 2, 2))


def test_jitter_draws_brightness_and_contrast_independently():
    """Grey 4x4, left half .4, right half .6; crop = whole image (scale 1, ratio 1, exact resample). Without
    clamping, either order of the jitter gives mean' = b * mean and spread' = b * c * spread, so b and c
    can be read back: both within [.8, 1.2] and not tied to each other (c == b would give spread ratio
    == mean ratio squared for every seed)."""
    a = np.full((4, 4, 3), 102, np.uint8)
    a[:, 2:] = 153
    t = ImageTransform(4, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.2)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    bs, cs = [], []
    for seed in range(12):
        y = t(Image.fromarray(a), seed) * std + mean                      # back to [0, 1]
        b = y.mean().item() / 0.5
        c = (y[:, :, 2:].mean() - y[:, :, :2].mean()).item() / (0.2 * b)
        bs.append(b)
        cs.append(c)
    assert all(0.8 - 1e-4 <= v <= 1.2 + 1e-4 for v in bs + cs)
    assert max(abs(b - c) for b, c in zip(bs, cs)) > 0.05
