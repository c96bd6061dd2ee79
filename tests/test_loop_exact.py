"""The Trainer's loop schedule and fault paths, pinned on tiny real runs (``tiny`` preset, shapes data, CPU).

What is pinned: the log schedule (every ``log_every`` steps and always the last one) with its throughput
window (samples since the last log over the time since the last log: a counting clock makes it exact),
the checkpoint schedule (every ``ckpt_every`` steps plus one final save, never twice for the same step),
``train(until=N)`` (stop at N, checkpointed, the Trainer closed), a SIGTERM / SIGINT received during a step
(save, stop after that step, the previous handlers put back), the validation schedule (``eval_every``) and
the model left in train mode after it, a semi-hard refresh done once when the batch after it is skipped,
``blame_gradient`` (each guilty objective named once, an objective without gradient passed over, RNG and
objective state restored) and the process-group decisions of ``distributed.init_distributed`` /
``env_world`` (backend, device, timeout, the started-group mark).
"""
import datetime
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import yaml

import finealign.distributed as D
from finealign.config import load_config
from finealign.train import loop
from finealign.train.faults import blame_gradient
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer

TINY = ["model.preset=tiny", "data.source=shapes", "data.num_samples=32", "data.batch_size=8",
        "train.steps=4", "train.ckpt_every=0", "train.log_every=1", "train.warmup=1", "train.keep=0",
        "train.device=cpu", "train.threads=1"]


def tiny(tmp_path, *extra, recipe="clip"):
    return Trainer(load_config(recipe, [*TINY, *extra, f"train.run_dir={tmp_path}"]), progress=False)


def spy_saves(t):
    """Record the step of every save (the real save still runs)."""
    steps, real = [], t.save

    def save():
        steps.append(t.step)
        return real()
    t.save = save
    return steps


def ckpt_steps(run_dir):
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


# ---------------------------------------------------------------- log / checkpoint schedules

def test_log_every_and_last_step_with_exact_throughput_window(tmp_path, monkeypatch):
    ticks = iter(range(1, 100))                 # every perf_counter call: one second later
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    t = tiny(tmp_path, "train.log_every=3")
    t.train()
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [3, 4]           # every 3rd step, and the last one
    # t0=1; step 3: dt = 2 - 1, 3 batches of 8 seen; then t0=3 and the count restarts: step 4: dt = 4 - 3
    assert [r["train/samples_per_s"] for r in rows] == [24.0, 8.0]
    assert [(r["train/skipped"], r["train/nonfinite_skipped"]) for r in rows] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("every,saves", [(3, [3, 4]), (2, [2, 4]), (0, [4])])
def test_checkpoint_every_n_steps_plus_one_final_save(tmp_path, every, saves):
    t = tiny(tmp_path, f"train.ckpt_every={every}")
    seen = spy_saves(t)
    t.train()
    assert seen == saves                                 # the last step is never saved twice
    assert ckpt_steps(tmp_path) == saves
    assert t.last_checkpoint == tmp_path / "checkpoints" / "step_00000004"
    assert (tmp_path / "skipped.yaml").exists()


def test_until_stops_checkpointed_closes_and_resume_finishes(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t = tiny(tmp_path)
    seen = spy_saves(t)
    t.train(until=2)
    assert t.step == 2 and seen == [2] and ckpt_steps(tmp_path) == [2]
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2]
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RuntimeError, match="this Trainer has finished"):
        t.train()
    assert t.step == 2
    r = Trainer(load_config("clip", [*TINY, f"train.run_dir={tmp_path}"]), resume="latest", progress=False)
    assert r.step == 2 and r.last_checkpoint.name == "step_00000002"
    r.train(until=10)                                    # past train.steps: train.steps
    assert r.step == 4 and ckpt_steps(tmp_path) == [2, 4]
    assert [x["step"] for x in train_rows(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_step_saves_and_stops_after_it(tmp_path, sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t = tiny(tmp_path, "train.ckpt_every=3")
    seen = spy_saves(t)
    real = t.train_step

    def step(batch, rows=None):
        out = real(batch, rows)
        if t.step == 1:                       # during the second step
            os.kill(os.getpid(), sig)
        return out
    t.train_step = step
    t.train()
    assert t.step == 2 and t._stop_signal == sig
    assert seen == [2] and ckpt_steps(tmp_path) == [2]
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2]
    assert {s: signal.getsignal(s) for s in before} == before


def test_resume_continues_the_nonfinite_skip_count(tmp_path):
    t = tiny(tmp_path, "train.skip_nonfinite=1")
    itc = t.objectives["itc"]
    orig, calls = itc.forward, []
    itc.forward = lambda f, b, c: (lambda r: {**r, "loss": r["loss"] * float("nan")} if len(calls) == 1 else r)(
        calls.append(1) or orig(f, b, c))
    t.train(until=1)
    assert t.step == 1 and t.nonfinite.skipped == 1
    r = Trainer(load_config("clip", [*TINY, "train.skip_nonfinite=1", f"train.run_dir={tmp_path}"]),
                resume="latest", progress=False)
    assert r.nonfinite.skipped == 1                      # the budget is the whole run's


# ---------------------------------------------------------------- validation / refresh schedules

def test_eval_every_logs_val_metrics_and_leaves_train_mode(tmp_path):
    t = tiny(tmp_path, "train.eval_every=2", "eval.max_images=16")
    evals = []
    real = t.evaluate_val
    t.evaluate_val = lambda: evals.append(t.step) or real()
    t.train()
    assert evals == [2, 4]
    val = [r for r in read_metrics(tmp_path) if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in val] == [2, 4]
    assert t.model.training                              # the last step evaluated: back in train mode


def test_refresh_runs_once_when_the_batch_after_it_is_skipped(tmp_path):
    t = Trainer(load_config("clip", [
        "data.source=shapes-items", "data.num_samples=32", "data.batch_size=8", "data.sampler=semi_hard",
        "data.refresh_every=2", "data.refresh_embed=text", "train.lr=1e-5", "train.warmup=1", "train.steps=2",
        "train.ckpt_every=0", "train.log_every=1", "train.threads=1", "train.skip_nonfinite=1",
        f"train.run_dir={tmp_path}"]), progress=False)
    itc = t.objectives["itc"]
    orig, calls = itc.forward, []

    def forward(f, b, c):
        calls.append(1)
        res = orig(f, b, c)
        return {**res, "loss": res["loss"] * float("nan")} if len(calls) == 1 else res
    itc.forward = forward
    t.train()
    assert t.step == 2 and t.nonfinite.skipped == 1
    assert t.refreshes == 1                              # before step 1 only: not again after the skip
    assert t.nonfinite.last == "step 0: objective 'itc' produced a non-finite loss (nan)"
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "nonfinite/skipped" in r] == [1]      # the step it would have been
    assert [r["train/nonfinite_skipped"] for r in rows if "train/loss" in r] == [1, 1]
    assert [r["step"] for r in read_metrics(tmp_path) if "sampler/refresh_s" in r] == [0]


def test_skipped_samples_are_counted_in_the_metrics_and_skipped_yaml(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rows = ["filepath,title"]
    for i in range(14):
        Image.new("RGB", (16, 16), (i * 9, 90, 200 - i * 9)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a patch number {i % 3}")
    rows += ["img/gone1.png,a missing file", "img/gone2.png,another missing file"]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    t = Trainer(load_config("clip", [*TINY, "data.num_samples=0", "data.source=csv", f"data.root={root}", "data.augment=false",
                                     "train.steps=2", f"train.run_dir={tmp_path / 'run'}"]), progress=False)
    t.train()
    got = yaml.safe_load((tmp_path / "run" / "skipped.yaml").read_text())
    assert got["counts"] == {"missing file": 2}
    assert [r["train/skipped"] for r in train_rows(tmp_path / "run")][-1] == 2     # 16 rows: both batches read


# ---------------------------------------------------------------- blame_gradient

def _nan_grad(obj):
    """The objective's loss stays finite; its gradient is NaN (d sqrt(x)/dx at 0, times 0)."""
    orig = obj.forward
    obj.forward = lambda f, b, c: (lambda r: {**r, "loss": r["loss"] + torch.sqrt(0.0 * f.image_embed.sum())})(
        orig(f, b, c))


def _micro(t, n=2):
    batch = next(iter(t.loader))
    h = len(batch) // n
    return [batch.slice(i * h, (i + 1) * h) for i in range(n)]


def test_blame_names_each_guilty_objective_once_skipping_gradient_free_ones(tmp_path):
    t = tiny(tmp_path, recipe="coca")
    assert list(t.objectives) == ["itc", "ic"]
    _nan_grad(t.objectives["ic"])
    micro = _micro(t)
    assert blame_gradient(t, micro) == ["ic"]            # guilty in both micro-batches: named once
    itc = t.objectives["itc"]                            # a loss without gradient first: passed over
    itc.forward = lambda f, b, c: {"loss": torch.tensor(1.0)}
    assert blame_gradient(t, micro) == ["ic"]
    _nan_grad(t.objectives["ic"])                        # not every parameter reaches ic's loss either
    t.objectives["itc"].forward = lambda f, b, c: {"loss": f.image_embed.sum() * 0.0}
    assert blame_gradient(t, micro) == ["ic"]


def test_blame_restores_rng_and_objective_state(tmp_path):
    t = tiny(tmp_path, "model.momentum=0.99", recipe="semmim")
    name = next(iter(t.objectives))
    _nan_grad(t.objectives[name])
    micro = _micro(t, 1)
    state = {k: v.clone() for k, v in t.objectives.state_dict().items()}
    mstate = {k: v.clone() for k, v in t.model.state_dict().items()}
    rng = torch.get_rng_state()
    assert name in blame_gradient(t, micro)
    assert torch.equal(torch.get_rng_state(), rng)
    after = t.objectives.state_dict()
    assert state and all(torch.equal(after[k], v) for k, v in state.items())
    after = t.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in mstate.items())


# ---------------------------------------------------------------- distributed: env and init decisions

def test_env_world_reads_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.env_world() == D.DistInfo(0, 1, 0) and not D.env_world().enabled and D.env_world().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    e = D.env_world()
    assert (e.rank, e.world_size, e.local_rank) == (3, 4, 1) and e.enabled and not e.is_main
    assert D.DistInfo(world_size=2).enabled and D.DistInfo(rank=0, world_size=2).is_main
    # one process: no group is started, the environment is the answer
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **k: pytest.fail("no group for one process"))
    assert D.init_distributed("cpu") == D.DistInfo(0, 1, 1)


@pytest.mark.parametrize("cuda,device,backend", [
    (False, "auto", "gloo"), (True, "auto", "nccl"), (True, "cuda", "nccl"), (True, "cpu", "gloo"),
    (False, "cuda:1", "nccl"), (True, "cuda:0", "nccl")])
def test_init_distributed_backend_device_and_timeout(monkeypatch, cuda, device, backend):
    """The decisions only (a real 2-rank group: test_distributed.py): NCCL exactly when the run trains on
    CUDA, this process's GPU selected first, the timeout passed on, the process marked as grouped."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(D.dist, "init_process_group", lambda b, timeout: calls.append((b, timeout)))
    monkeypatch.setattr(D, "_started_group", False)
    D.init_distributed(device, timeout_s=7.5)
    want = [("set_device", 1)] if backend == "nccl" else []
    assert calls == want + [(backend, datetime.timedelta(seconds=7.5))]
    assert D._started_group is True


def test_mean_over_ranks_keeps_every_key(tmp_path):
    t = tiny(tmp_path)
    m = {"loss": 2.5, "a/loss": 1.0, "lr": 0.25}
    assert t._mean_over_ranks(m) is m                    # one process: untouched
    t.dist = D.DistInfo(world_size=2)                    # no group: the reduction is the identity
    assert t._mean_over_ranks(m) == m


def test_init_distributed_inside_a_started_group_starts_nothing(tmp_path, monkeypatch):
    """A real (one-process gloo) group already started: init_distributed reports it, whatever the env says."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "5")
    D.dist.init_process_group("gloo", store=D.dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert D.init_distributed("cpu") == D.DistInfo(0, 1, 5)
    finally:
        D.dist.destroy_process_group()


def test_pick_device_cuda_takes_this_ranks_gpu(monkeypatch):
    from finealign.config import ConfigError
    from finealign.train.setup import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)      # no index: the rank's GPU
    assert pick_device("cuda:1", local_rank=0) == torch.device("cuda", 1)    # an index is kept
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="train.device=cuda:2 but this machine has 2 CUDA device"):
        pick_device("cuda:2")
    with pytest.raises(ConfigError, match="is not a device"):
        pick_device("gpu0")


def test_blame_replays_each_micro_batch_with_its_own_mixing(tmp_path):
    """A gradient that is NaN only under the 2nd micro-batch's mixing draw is still traced to its objective:
    the replay mixes every micro-batch as the step did (seeded by step and micro-batch index)."""
    t = tiny(tmp_path, "train.grad_accum=2", "train.skip_nonfinite=1", recipe="timix")
    obj = t.objectives["mixed_itc"]
    orig, lams = obj.forward, []

    def forward(f, b, c):
        r = orig(f, b, c)
        lam = f.extras["mix_lambda"].detach().clone()
        if len(lams) < 2:
            lams.append(lam)                             # the step's own two micro-batches
        if len(lams) == 2 and torch.equal(lam, lams[1]):
            r = {**r, "loss": r["loss"] + torch.sqrt(0.0 * f.image_embed.sum())}   # finite loss, NaN gradient
        return r
    obj.forward = forward
    out = t.train_step(next(iter(t.loader)))
    assert not torch.equal(lams[0], lams[1])             # the two micro-batches are mixed differently
    assert out["skipped"] == 1 and "objective 'mixed_itc' produced a non-finite gradient" in out["reason"]
