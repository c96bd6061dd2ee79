"""Checkpoint save / find / load: round trip, pruning, corruption fallback, crash safety, RNG."""
import logging
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from finealign.train.checkpoint import (CheckpointError, CheckpointWriteError, find_checkpoint, get_rng_state,
                                        list_checkpoints, load_checkpoint, load_config_from_checkpoint, save_checkpoint,
                                        set_rng_state)

CONFIG = {"model": {"preset": "tiny", "embed_dim": 8}, "train": {"lr": 1e-3, "steps": 10}, "recipe": "test"}


class Net(nn.Module):
    """Embedding tied to the output head, a norm, a scalar and a buffer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight                   # tied
        self.logit_scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("offset", torch.zeros(10))

    def forward(self, x):                                    # x: (B, T) long -> (B, T, 10)
        h = self.norm(torch.relu(self.lin(self.emb(x))))
        return self.head(h) * self.logit_scale.exp() + self.offset


def _train(model, opt, sched=None, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 10, (4, 5), generator=g)
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def test_round_trip_model_optimizer_scheduler(tmp_path):
    model, opt, sched = _make(0)
    model.offset.fill_(0.25)
    _train(model, opt, sched)
    ckpt = save_checkpoint(tmp_path, 3, model, CONFIG, opt, sched, loader_state={"epoch": 1, "index": 12},
                           extra={"val": np.float32(0.5), "arr": np.arange(3)})
    assert ckpt == tmp_path / "checkpoints" / "step_00000003"
    assert sorted(os.listdir(ckpt)) == ["config.yaml", "meta.json", "model.safetensors", "state.pt"]

    model2, opt2, sched2 = _make(1)                          # different init
    out = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert out["step"] == 3 and out["path"] == ckpt
    assert out["config"] == CONFIG
    assert out["loader_state"] == {"epoch": 1, "index": 12}
    assert out["extra"]["val"] == 0.5 and torch.equal(out["extra"]["arr"], torch.arange(3))
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert model2.head.weight.data_ptr() == model2.emb.weight.data_ptr()   # still tied
    x = torch.randint(0, 10, (2, 5))
    assert torch.equal(model(x), model2(x))

    # optimizer + scheduler: same state, and the next step gives identical parameters
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][key])
    assert sched2.last_epoch == sched.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _train(model, opt, sched, steps=1, seed=7)
    _train(model2, opt2, sched2, steps=1, seed=7)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_state_is_weights_only_and_config(tmp_path):
    model, opt, sched = _make()
    ckpt = save_checkpoint(tmp_path, 1, model, CONFIG, opt, sched)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 1 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert load_config_from_checkpoint(tmp_path) == CONFIG
    assert load_config_from_checkpoint(ckpt) == CONFIG


def test_non_weights_only_extra_rejected(tmp_path):
    model, _, _ = _make()
    with pytest.raises(TypeError, match=r"state\['extra'\]\['bad'\]"):
        save_checkpoint(tmp_path, 1, model, CONFIG, extra={"bad": object()})
    assert list_checkpoints(tmp_path) == []


def test_strict_load_lists_keys(tmp_path):
    model, _, _ = _make()
    ckpt = save_checkpoint(tmp_path, 1, model, CONFIG)
    other = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CheckpointError, match=r"missing keys \[0\.bias, 0\.weight\].*unexpected keys \[emb"):
        load_checkpoint(ckpt, other)
    with pytest.raises(CheckpointError, match="holds no optimizer"):
        load_checkpoint(ckpt, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_keep_prunes_old(tmp_path):
    model, _, _ = _make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, CONFIG, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000003"
    assert find_checkpoint(tmp_path, 2) == tmp_path / "checkpoints" / "step_00000002"
    save_checkpoint(tmp_path, 1, model, CONFIG, keep=1)      # the new one survives even if oldest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]


def test_corrupt_latest_falls_back(tmp_path, caplog):
    model, opt, _ = _make()
    _train(model, opt)
    save_checkpoint(tmp_path, 1, model, CONFIG, opt)
    _train(model, opt)
    newest = save_checkpoint(tmp_path, 2, model, CONFIG, opt)
    bad = newest / "model.safetensors"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="finealign.train.checkpoint"):
        found = find_checkpoint(tmp_path, "latest")
    assert found == tmp_path / "checkpoints" / "step_00000001"
    assert str(bad) in caplog.text
    with pytest.raises(CheckpointError, match="step_00000002/model.safetensors"):
        load_checkpoint(newest, Net())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        find_checkpoint(tmp_path, 2)
    assert load_checkpoint(tmp_path, Net())["step"] == 1     # run dir -> newest valid
    # nothing valid at all -> error naming the files
    bad1 = found / "state.pt"
    bad1.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt"):
        find_checkpoint(tmp_path)


def _flip_last_byte(path):
    """Bit rot: one byte of the file's tail (tensor data, not a header) changed in place; the size stays."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 1)
        last = f.read(1)[0]
        f.seek(size - 1)
        f.write(bytes([last ^ 0x01]))
    assert path.stat().st_size == size


@pytest.mark.parametrize("fname", ["model.safetensors", "state.pt"])
def test_same_size_corruption_is_caught_by_the_checksum(tmp_path, caplog, fname):
    """A changed byte that keeps the file's size (and leaves it parseable) fails the sha256 check: "latest"
    falls back to the previous checkpoint, and a checkpoint dir named directly is refused, not loaded."""
    model, opt, _ = _make()
    _train(model, opt)
    save_checkpoint(tmp_path, 1, model, CONFIG, opt)
    _train(model, opt)
    newest = save_checkpoint(tmp_path, 2, model, CONFIG, opt)
    bad = newest / fname
    _flip_last_byte(bad)
    with caplog.at_level(logging.WARNING, logger="finealign.train.checkpoint"):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step_00000001"
    assert str(bad) in caplog.text and "sha256" in caplog.text
    with pytest.raises(CheckpointError, match=f"step_00000002/{fname} is corrupt: sha256"):
        load_checkpoint(newest, Net(), torch.optim.AdamW(Net().parameters()))
    if fname == "model.safetensors":                         # the flipped file still parses: only the check stops it
        assert load_checkpoint(newest, Net(), verify=False)["step"] == 2


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, _ = _make()
    save_checkpoint(tmp_path, 1, model, CONFIG, opt)

    def boom(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointWriteError, match=r"step_00000002: simulated crash.*step_00000001\) is intact"):
        save_checkpoint(tmp_path, 2, model, CONFIG, opt)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000001"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert load_checkpoint(tmp_path, Net(), torch.optim.AdamW(Net().parameters()))["step"] == 1
    # a hard crash leaves a hidden temp dir: never a checkpoint, cleaned by the next save
    (tmp_path / "checkpoints" / ".tmp-step_00000002-1-abc").mkdir()
    assert find_checkpoint(tmp_path).name == "step_00000001"
    save_checkpoint(tmp_path, 2, model, CONFIG)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000001", "step_00000002"]


def test_rng_round_trip(tmp_path):
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    state = get_rng_state()
    first = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())
    set_rng_state(state)
    again = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2]) and first[3] == again[3]

    # through a checkpoint (weights_only load), with restore_rng=True
    assert np.random.get_state()[3] == 1      # a gaussian is cached (randn draws pairs): the checkpoint keeps it
    save_checkpoint(tmp_path, 1, Net(), CONFIG)
    expected = (torch.rand(4), random.random(), np.random.randn(2))
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    load_checkpoint(tmp_path, restore_rng=True)
    got = (torch.rand(4), random.random(), np.random.randn(2))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


def test_keep_zero_keeps_all(tmp_path):
    """``keep <= 0`` keeps every checkpoint (nothing pruned), the newest is still `latest`."""
    model, _, _ = _make()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, CONFIG, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_fallback_is_the_newest_valid_checkpoint(tmp_path, caplog):
    """`latest` (step 3) is corrupt: the fallback is step 2, the newest valid one, not the oldest."""
    model, _, _ = _make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, CONFIG, keep=0)
    _truncate(tmp_path / "checkpoints" / "step_00000003" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="finealign.train.checkpoint"):
        found = find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_00000002"
    assert f"falling back to checkpoint {found}" in caplog.text


def test_latest_file_is_followed(tmp_path):
    """``checkpoints/latest`` decides, not the highest step: it may name an older valid checkpoint."""
    model, _, _ = _make()
    save_checkpoint(tmp_path, 1, model, CONFIG)
    save_checkpoint(tmp_path, 2, model, CONFIG)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001\n")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"
    assert load_checkpoint(tmp_path)["step"] == 1


def test_load_without_restore_rng_leaves_global_rng_alone(tmp_path):
    """The default ``restore_rng=False`` must not reset torch / Python / numpy RNGs to the saved state."""
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    save_checkpoint(tmp_path, 1, Net(), CONFIG)              # saves the RNG state after Net()'s init

    def draws():
        return torch.rand(4), random.random(), np.random.rand(3)

    def seed_all():
        torch.manual_seed(77)
        random.seed(77)
        np.random.seed(77)

    seed_all()
    expected = draws()
    seed_all()
    load_checkpoint(tmp_path)
    got = draws()
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


def test_write_error_names_the_newest_previous_checkpoint(tmp_path, monkeypatch):
    model, _, _ = _make()
    save_checkpoint(tmp_path, 1, model, CONFIG)
    save_checkpoint(tmp_path, 2, model, CONFIG)

    def boom(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointWriteError) as ei:
        save_checkpoint(tmp_path, 3, model, CONFIG)
    monkeypatch.undo()
    msg = str(ei.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoints' / 'step_00000003'}: simulated crash" in msg
    assert f"({tmp_path / 'checkpoints' / 'step_00000002'}) is intact" in msg
    assert "step_00000001" not in msg
    assert find_checkpoint(tmp_path).name == "step_00000002"


def test_file_missing_from_meta_is_not_trusted(tmp_path, caplog):
    """A meta.json that does not list a file (its hash cannot be checked) makes the checkpoint invalid."""
    import json
    model, _, _ = _make()
    save_checkpoint(tmp_path, 1, model, CONFIG)
    newest = save_checkpoint(tmp_path, 2, model, CONFIG)
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]["state.pt"]
    (newest / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="finealign.train.checkpoint"):
        assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000001"
    assert f"{newest / 'state.pt'} is not listed in {newest / 'meta.json'}" in caplog.text
    with pytest.raises(CheckpointError, match="state.pt is not listed in"):
        find_checkpoint(tmp_path, 2)


def test_failed_latest_write_drops_the_new_checkpoint(tmp_path, monkeypatch):
    """If `latest` cannot be replaced, the new (complete) step dir is removed so that `latest` and the
    newest step dir agree; the previous checkpoint stays `latest`."""
    from finealign.train import checkpoint as ckpt_mod
    model, _, _ = _make()
    save_checkpoint(tmp_path, 1, model, CONFIG)

    def boom(path, text):
        raise OSError("cannot write latest")

    monkeypatch.setattr(ckpt_mod, "_write_text_atomic", boom)
    with pytest.raises(CheckpointWriteError, match=r"step_00000002: cannot write latest.*step_00000001\) is intact"):
        save_checkpoint(tmp_path, 2, model, CONFIG)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert find_checkpoint(tmp_path).name == "step_00000001"


def test_resave_same_step_replaces_it(tmp_path):
    """Saving a step that already exists replaces it: the second save succeeds, verifies, holds the new
    weights, and leaves no temporary / old dirs behind."""
    model, opt, _ = _make()
    first = save_checkpoint(tmp_path, 2, model, CONFIG)
    _train(model, opt)                                       # different weights now
    second = save_checkpoint(tmp_path, 2, model, CONFIG, extra={"again": 1})
    assert second == first
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]
    assert find_checkpoint(tmp_path, 2) == second            # verified (sha256 of every file)
    model2 = Net()
    out = load_checkpoint(tmp_path, model2)
    assert out["step"] == 2 and out["extra"] == {"again": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
