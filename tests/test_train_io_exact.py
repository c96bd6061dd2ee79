"""Exact behaviour of the checkpoint I/O helpers and the metrics log that the round-trip tests leave open.

Pinned here: which leftovers a save prunes (other processes' ``.tmp-`` dirs only), numeric (not textual)
ordering of step directories and the 8-digit name rule, ``find_checkpoint`` accepting ``step_XXXXXXXX`` and
a run dir that itself looks like a checkpoint, one error per bad candidate, the size check's own message,
tied weights restored as the same tensor, ``load_config_from_checkpoint`` verifying config.yaml,
torch.compile unwrapping, ``_weights_only_safe`` conversions (detach, non-contiguous numpy, numpy ints stay
ints, container types kept), ``_dedup_state_dict`` (offset-distinct views are not aliases, whole-storage
reshapes are copied, views of larger buffers get their own storage), ``fsync_path`` on directories, and
``MetricLogger`` / ``_truncate_after`` (rows after the resumed step and torn lines dropped, fresh runs
truncate).
"""
import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from finealign.train import ckpt_io
from finealign.train.checkpoint import (CheckpointError, find_checkpoint, list_checkpoints, load_checkpoint,
                                        load_config_from_checkpoint, read_state, read_weights, save_checkpoint,
                                        verify_checkpoint)
from finealign.train.logging import MetricLogger, read_metrics


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))


def _save(tmp_path, step, model=None, config=None, **kw):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path, step, model or Tied(), {"a": 1} if config is None else config, **kw)


# ---------------------------------------------------------------- save / prune / list

def test_prune_removes_other_processes_leftovers_only(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    foreign = root / ".tmp-step_00000001-999999999-abcd1234"
    old = root / ".old-step_00000001-ffff0000"
    mine = root / f".tmp-step_00000009-{os.getpid()}-abcd1234"     # a save of this process, in flight
    for d in (foreign, old, mine):
        d.mkdir()
    _save(tmp_path, 1)
    assert not foreign.exists() and not old.exists()
    assert mine.exists()


def test_list_checkpoints_numeric_order_and_name_rule(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_100000000", "step_99999999", "step_00000005", "step_12", "step_00000007x", "other"):
        (root / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_99999999", "step_100000000"]


def test_find_checkpoint_step_forms_and_run_dir_named_like_a_checkpoint(tmp_path):
    run = tmp_path / "step_00000001"                   # a run dir whose name matches the pattern
    _save(run, 2)
    _save(run, 3)
    assert find_checkpoint(run).name == "step_00000003"
    assert find_checkpoint(run, "step_00000002").name == "step_00000002"
    assert find_checkpoint(run, 2).name == "step_00000002"


def test_each_bad_candidate_is_reported_once(tmp_path):
    ck = _save(tmp_path, 1)
    (ck / "config.yaml").write_text("bb: 22\n")       # a different size: caught by the byte count
    with pytest.raises(CheckpointError) as e:
        find_checkpoint(tmp_path)
    assert str(e.value).count("config.yaml is corrupt") == 1
    with pytest.raises(CheckpointError, match=r"bytes, expected \d+ \(truncated\?\)"):
        verify_checkpoint(ck)


def test_load_config_verifies_its_file_and_empty_config_is_a_dict(tmp_path):
    ck = _save(tmp_path, 1, config={"a": 1})
    (ck / "config.yaml").write_text("a: 2\n")         # same size, other content: only sha256 tells
    with pytest.raises(CheckpointError, match="sha256"):
        load_config_from_checkpoint(ck)
    ck2 = _save(tmp_path / "r2", 1, config={})
    assert load_config_from_checkpoint(ck2) == {}
    assert read_state(ck2 / "state.pt")["extra"] == {}
    (ck2 / "config.yaml").write_text("")               # an empty file reads as an empty config
    assert load_config_from_checkpoint(ck2, verify=False) == {}


def test_tied_weights_come_back_as_one_tensor(tmp_path):
    ck = _save(tmp_path, 1)
    sd = read_weights(ck / "model.safetensors")
    assert sd["head.weight"] is sd["emb.weight"]


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated:DeprecationWarning")   # torch's own import
def test_compiled_model_is_saved_under_plain_names(tmp_path):
    torch.manual_seed(0)
    net = Tied()
    ck = save_checkpoint(tmp_path, 1, torch.compile(net), {})
    assert set(read_weights(ck / "model.safetensors")) == {"emb.weight", "head.weight"}
    other = Tied()
    load_checkpoint(ck, other)
    assert torch.equal(other.emb.weight, net.emb.weight)


# ---------------------------------------------------------------- ckpt_io

def test_weights_only_safe_conversions():
    p = torch.ones(2, requires_grad=True)
    out = ckpt_io._weights_only_safe({"t": p * 2}, "s")["t"]
    assert not out.requires_grad and out.grad_fn is None
    rev = np.arange(4)[::-1]                           # negative stride: torch.from_numpy refuses it
    assert torch.equal(ckpt_io._weights_only_safe(rev, "s"), torch.tensor([3, 2, 1, 0]))
    n = ckpt_io._weights_only_safe(np.int64(3), "s")
    assert n == 3 and type(n) is int
    assert type(ckpt_io._weights_only_safe(np.float32(0.5), "s")) is float
    res = ckpt_io._weights_only_safe({"t": (1, 2), "s": {3}, "l": [4], "o": OrderedDict(b=1, a=2)}, "s")
    assert res["t"] == (1, 2) and type(res["t"]) is tuple
    assert res["s"] == {3} and type(res["s"]) is set
    assert type(res["o"]) is OrderedDict and list(res["o"]) == ["b", "a"]
    with pytest.raises(TypeError, match=r"s\['x'\]\[1\] is a builtins.object"):
        ckpt_io._weights_only_safe({"x": [1, object()]}, "s")


def test_dedup_views_by_offset_and_shared_storage(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    kept, aliases = ckpt_io._dedup_state_dict({"r0": w[0], "r1": w[1]})     # same shape, other offsets
    assert aliases == {}
    assert torch.equal(kept["r0"], torch.tensor([0.0, 1, 2])) and torch.equal(kept["r1"], torch.tensor([3.0, 4, 5]))
    # views of a larger buffer get their own storage of exactly their size
    kept, _ = ckpt_io._dedup_state_dict({"r1": w[1]})
    assert kept["r1"].untyped_storage().nbytes() == 3 * 4
    # a whole-storage reshape of a kept tensor is a private copy, so safetensors accepts the dict
    kept, aliases = ckpt_io._dedup_state_dict({"w": w, "flat": w.view(-1)})
    assert aliases == {}
    assert kept["flat"].untyped_storage().data_ptr() != kept["w"].untyped_storage().data_ptr()
    save_file(kept, str(tmp_path / "x.safetensors"))
    kept, aliases = ckpt_io._dedup_state_dict({"a": w, "b": w})
    assert aliases == {"b": "a"} and list(kept) == ["a"]


def test_fsync_path_directories_best_effort_files_strict(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")

    def fail(fd):
        raise OSError(5, "EIO")
    monkeypatch.setattr(os, "fsync", fail)
    ckpt_io.fsync_path(tmp_path)                       # a directory: ignored
    with pytest.raises(OSError):
        ckpt_io.fsync_path(f)


# ---------------------------------------------------------------- metrics log

def _write_rows(path, steps, torn=False):
    text = "".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in steps)
    path.write_text(text + ('{"step": 9, "tra' if torn else ""))


def test_resumed_metrics_drop_rows_after_the_step_and_torn_lines(tmp_path):
    _write_rows(tmp_path / "metrics.jsonl", [1, 2, 3, 4], torn=True)
    m = MetricLogger(tmp_path, tensorboard=False, resume_step=2)
    m.log(3, {"loss": 7, "name": "x"})
    m.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1] == {"step": 3, "train/loss": 7.0, "train/name": "x"}
    assert type(rows[-1]["train/loss"]) is float


def test_resume_at_last_logged_step_keeps_everything_and_fresh_run_starts_empty(tmp_path):
    _write_rows(tmp_path / "metrics.jsonl", [1, 2])
    MetricLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    m = MetricLogger(tmp_path, tensorboard=False)
    m.log(1, {"a": 1}, prefix="val")
    m.close()
    assert read_metrics(tmp_path) == [{"step": 1, "val/a": 1.0}]
    assert read_metrics(tmp_path / "nowhere") == []


def test_blank_lines_are_neither_dropped_rows_nor_read(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    MetricLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


# ---------------------------------------------------------------- sampler refresh (text path)

class _Tok:
    def encode_batch(self, texts, length):                # id = word length, mask = word present
        import random
        assert not any("  " in t for t in texts)          # captions arrive whitespace-normalised
        random.random(), np.random.rand(), torch.rand(1)  # a stochastic tokenizer draws from every RNG
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        for i, t in enumerate(texts):
            for j, w in enumerate(t.split()[:length]):
                ids[i, j] = len(w)
        return ids, (ids > 0).long()


class _TextTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def encode_text(self, ids, mask):                     # (B, T) -> (B, 2): [sum of ids, words]
        assert not self.training and not torch.is_grad_enabled()
        return {"embed": torch.stack([ids.float().sum(1), mask.float().sum(1)], 1)}


class _Pairs:
    def __init__(self, caps):
        self.caps, self.samples = caps, list(range(len(caps)))

    def __len__(self):
        return len(self.caps)

    def pair(self, i):
        return i, self.caps[i]


class _Loader:
    def __init__(self, caps):
        self.dataset, self.got = _Pairs(caps), None

    def update_embeddings(self, emb):
        self.got = emb

    def sampler_stats(self):
        return {"n": 1.0}


def test_refresh_text_embeddings_are_centred_and_state_is_restored():
    import random
    from finealign.train.refresh import refresh_sampler
    model = _TextTower().train()
    loader = _Loader(["a  bb", "ccc", "dd dd dd"])       # ids sums 3, 3, 6; words 2, 1, 3
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expect = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    res = refresh_sampler(model, loader, "text", tokenizer=_Tok(), context_length=4, image_size=0,
                          device="cpu", batch_size=2)
    assert (torch.rand(1), random.random(), np.random.rand()) == expect
    assert model.training and res["n"] == 1.0 and res["refresh_s"] >= 0
    assert torch.allclose(loader.got, torch.tensor([[-1.0, 0], [-1, -1], [2, 1]]))
    shared = []
    refresh_sampler(model, loader, "text", tokenizer=_Tok(), context_length=4, image_size=0, device="cpu",
                    share=lambda e: shared.append(e) or e * 2)
    assert torch.allclose(loader.got, 2 * shared[0])
    refresh_sampler(model, loader, "text", tokenizer=None, context_length=0, image_size=0, device="cpu",
                    compute=False, share=lambda e: torch.ones(3, 2))
    assert torch.equal(loader.got, torch.ones(3, 2))
    model.eval()
    refresh_sampler(model, loader, "text", tokenizer=_Tok(), context_length=4, image_size=0, device="cpu")
    assert not model.training


# ---------------------------------------------------------------- the step's gradients
def test_every_step_starts_from_no_gradient(tmp_path):
    """A step's update uses its own batch's gradient only: nothing is left in ``.grad`` for the next step."""
    from finealign.config import load_config
    from finealign.train.loop import Trainer
    cfg = load_config("clip", ["model.preset=tiny", "data.source=shapes", "data.num_samples=16", "data.batch_size=8",
                               "train.steps=2", "train.warmup=0", "train.ckpt_every=0", "train.device=cpu",
                               "train.threads=1", f"train.run_dir={tmp_path}"])
    t = Trainer(cfg, progress=False)
    seen, step = [], t.train_step

    def recording(batch, *a, **k):
        seen.append(sum(p.grad is not None for p in t.model.parameters()))
        return step(batch, *a, **k)
    t.train_step = recording
    t.train()
    assert seen == [0, 0] and all(p.grad is None for p in t.model.parameters())
