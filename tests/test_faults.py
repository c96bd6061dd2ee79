"""Faults during training, each made real: a SIGKILLed / SIGTERMed / SIGINTed ``python -m finealign train``
process, a full disk while saving, truncated checkpoints, non-finite losses and gradients, malicious pickles,
and a rank of a ``torchrun`` job that dies. Tiny runs (``tiny`` preset, shapes data, a few steps, CPU).

Already shown elsewhere: keep-last-K (test_checkpoint.py::test_keep_prunes_old), corrupt ``latest`` falls back
naming the file (test_checkpoint.py::test_corrupt_latest_falls_back), a crash inside save keeps the previous
checkpoint (test_checkpoint.py::test_crash_mid_save_keeps_previous), in-process resume is exact
(test_train.py::test_resume_after_interruption_reproduces_losses), 2-rank TiMix resume is exact
(test_distributed.py), a non-finite loss stops naming step, objective and checkpoint
(test_train.py::test_nonfinite_loss_stops_with_step_and_objective).
"""
import errno
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finealign
from finealign import cli
from finealign.config import load_config
from finealign.interop.export import export
from finealign.train import checkpoint as ckpt
from finealign.train.checkpoint import CheckpointError, CheckpointWriteError
from finealign.train.logging import read_metrics
from finealign.train.loop import NonFiniteLossError, Trainer

STEPS = 10
COMMON = ["model.preset=tiny", "data.source=shapes", "data.num_samples=32", "data.batch_size=8",
          f"train.steps={STEPS}", "train.ckpt_every=2", "train.log_every=1", "train.warmup=2", "train.keep=2",
          "train.device=cpu", "train.threads=1", "train.deterministic=true"]


# ---------------------------------------------------------------- helpers: real training processes

def launch(recipe, run_dir, *extra, resume=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "finealign", "train", recipe, "--no-progress", *COMMON, *extra,
           f"train.run_dir={run_dir}", *(["--resume", "latest"] if resume else [])]
    n = len(list(run_dir.glob("log-*.txt")))
    out = open(run_dir / f"log-{n}.txt", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log_path = run_dir / f"log-{n}.txt"
    return proc


def finish(proc, timeout=180):
    rc = proc.wait(timeout=timeout)
    return rc, proc.log_path.read_text()


def logged_steps(run_dir):
    try:
        return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    except ValueError:                  # a line being written
        return []


def wait_for_step(proc, run_dir, step, timeout=120, resumed=False):
    """Poll the run's metrics until it has logged ``step`` (the process must still be running). ``resumed``:
    first wait for its "resumed from" line (from then on the metrics hold only this process's later steps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready = not resumed or "resumed from" in proc.log_path.read_text()
        if ready and max(logged_steps(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before step {step}:\n{proc.log_path.read_text()[-3000:]}")
        time.sleep(0.005)
    pytest.fail(f"step {step} not reached in {timeout} s")


def losses(run_dir):
    """step -> every loss the run logged at that step (each step once: a resumed run drops what the killed
    process logged after its checkpoint)."""
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows}


def latest_step(run_dir):
    return int(ckpt.find_checkpoint(run_dir).name[5:])


# ---------------------------------------------------------------- killed runs (real subprocesses)

def reference(recipe, run_dir):
    """The uninterrupted run, in this process (the same config, seed, thread count and deterministic mode as
    the subprocesses, so bitwise the same numbers) while a subprocess works beside it."""
    Trainer(load_config(recipe, [*COMMON, f"train.run_dir={run_dir}"]), progress=False).train()
    return losses(run_dir)


def kill_at_random_step(recipe, run_dir):
    proc = launch(recipe, run_dir)
    kill_at = random.Random(f"kill-{recipe}").randint(3, 5)           # after the step-2 checkpoint
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    assert max(logged_steps(run_dir)) < STEPS, "the run finished before the kill"


def interrupt(recipe, run_dir, sig):
    """Resume, send ``sig`` once a step is done; the run saves that step, says so and exits with 0."""
    before = latest_step(run_dir)
    proc = launch(recipe, run_dir, resume=True)
    wait_for_step(proc, run_dir, before + 1, resumed=True)
    proc.send_signal(sig)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    stopped = max(logged_steps(run_dir))
    assert f"at step {before}" in out                                     # "resumed from ... at step N"
    assert f"received signal {int(sig)}: saved" in out and f"stopped at step {stopped}" in out, out[-3000:]
    assert before < stopped < STEPS and latest_step(run_dir) == stopped   # the checkpoint is of that step


@pytest.mark.parametrize("recipe,signals", [
    ("coca", [signal.SIGTERM, signal.SIGINT]),     # killed, then resumed and stopped by each signal in turn
    ("sycoca", []),
    ("timix", []),
])
def test_killed_run_resumes_to_the_uninterrupted_losses(tmp_path, recipe, signals):
    """``python -m finealign train`` SIGKILLed at a random step (seeded; after the first checkpoint), then
    ``--resume latest`` (for coca, resumed runs stopped by SIGTERM and SIGINT first): every loss of every
    step in the run's metrics equals the uninterrupted run's, exactly."""
    run = tmp_path / "run"
    kill_at_random_step(recipe, run)
    for sig in signals:
        interrupt(recipe, run, sig)
    resumed_from = latest_step(run)
    final = launch(recipe, run, resume=True)
    expected = reference(recipe, tmp_path / "ref")                        # meanwhile
    rc, out = finish(final)
    assert rc == 0, out[-3000:]
    assert f"at step {resumed_from}" in out
    got = losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert got == expected


# ---------------------------------------------------------------- checkpoint writes

def _tiny_run(tmp_path, recipe="clip", *extra):
    cfg = load_config(recipe, [*COMMON, "train.steps=4", *extra,
                               f"train.run_dir={tmp_path}"])
    return Trainer(cfg, progress=False)


def test_save_fsyncs_every_file_and_directory_before_and_after_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = ckpt.save_checkpoint(tmp_path, 5, torch.nn.Linear(3, 2), {"a": 1})
    monkeypatch.undo()
    root = os.path.realpath(tmp_path / "checkpoints")
    moves = [e for e in events if e[0] == "replace"]
    assert len(moves) == 2, events
    (_, tmp, dst), (_, tmp_latest, latest) = moves
    tmp = os.path.realpath(tmp)
    assert dst == str(final) and Path(latest).name == "latest" and Path(tmp).name.startswith(".tmp-step_00000005")
    i_dir, i_latest = events.index(moves[0]), events.index(moves[1])
    for name in ("model.safetensors", "config.yaml", "state.pt", "meta.json"):
        assert events.index(("fsync", f"{tmp}/{name}")) < i_dir, name    # files durable before the rename
    assert events.index(("fsync", tmp)) < i_dir                           # the new dir's entries too
    assert ("fsync", root) in events[i_dir + 1:i_latest]                   # the rename itself
    assert events.index(("fsync", os.path.realpath(tmp_latest))) < i_latest
    assert events[i_latest + 1:] == [("fsync", root)]                     # the rename of `latest`


def test_full_disk_while_saving_stops_clearly_and_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):                # the second checkpoint hits a full disk mid-write
        calls.append(1)
        if len(calls) >= 2:
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    rc = cli.main(["train", "clip", "--no-progress", *COMMON, "train.steps=4", f"train.run_dir={run}"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_00000004'}" in err
    assert "No space left on device" in err and f"{run / 'checkpoints' / 'step_00000002'}) is intact" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000002"]      # no temp leftovers
    assert ckpt.load_checkpoint(run)["step"] == 2
    monkeypatch.setattr(torch, "save", save)                  # the error type, for API users
    with pytest.raises(CheckpointWriteError, match=r"step_00000005: \[Errno 28\]"):
        ckpt.save_checkpoint(run, 5, torch.nn.Linear(2, 2), {})
    monkeypatch.undo()
    assert ckpt.find_checkpoint(run).name == "step_00000002"
    resumed = Trainer(load_config("clip", [*COMMON, "train.steps=4", f"train.run_dir={run}"]),
                      resume="latest", progress=False)
    assert resumed.step == 2


def test_truncated_newest_checkpoint_named_and_resume_falls_back(tmp_path, caplog):
    _tiny_run(tmp_path).train()
    bad = tmp_path / "checkpoints" / "step_00000004" / "state.pt"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        t = Trainer(load_config("clip", [*COMMON, "train.steps=4", f"train.run_dir={tmp_path}"]),
                    resume="latest", progress=False)
    assert t.step == 2
    size = bad.stat().st_size                 # the size check names both sizes (the path alone holds "truncated")
    assert f"{bad} is corrupt: {size} bytes, expected {size + 10} (truncated?)" in caplog.text


# ---------------------------------------------------------------- numerical faults

def _nan_from(trainer, objective, when, kind):
    """Make ``objective`` non-finite on batches for which ``when(step, n)`` holds (n: 1 for the first batch
    it sees, ...): its loss (``kind='loss'``), or only its gradient (``'grad'``: sqrt at 0 has an infinite
    derivative, times 0 -> NaN; the loss stays finite)."""
    obj = trainer.objectives[objective]
    orig = obj.forward
    seen = []                           # batches (kept alive: ids stay unique); a re-run sees the same one

    def forward(f, b, c):
        res = orig(f, b, c)
        n = next((i for i, x in enumerate(seen, 1) if x is b), None)
        if n is None:
            seen.append(b)
            n = len(seen)
        if when(c.step, n):
            if kind == "loss":
                res = {**res, "loss": res["loss"] * float("nan")}
            else:
                res = {**res, "loss": res["loss"] + torch.sqrt(0.0 * f.image_embed.sum())}
        return res
    obj.forward = forward


def test_nonfinite_gradient_stops_naming_step_objective_and_checkpoint(tmp_path):
    t = _tiny_run(tmp_path, "coca", "train.clip_grad=0")        # no clipping: the check runs anyway
    _nan_from(t, "itc", lambda s, n: s == 3, "grad")
    with pytest.raises(NonFiniteLossError, match=r"step 3: objective 'itc' produced a non-finite gradient .*"
                                                 r"last good checkpoint: .*step_00000002"):
        t.train()
    assert ckpt.load_checkpoint(tmp_path)["step"] == 2


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_skip_nonfinite_skips_at_most_n_batches_then_stops(tmp_path, kind):
    t = _tiny_run(tmp_path / "skip", "coca", "train.skip_nonfinite=2")
    _nan_from(t, "ic", lambda s, n: n in (2, 3), kind)         # the 2nd and 3rd batch
    t.train()
    assert t.step == 4 and t.nonfinite.skipped == 2
    opt_steps = {int(s["step"]) for s in t.optimizer.state_dict()["state"].values()}
    assert opt_steps == {4}                                     # 6 batches, 4 optimizer steps
    rows = read_metrics(tmp_path / "skip")
    skipped = [r for r in rows if "nonfinite/skipped" in r]
    assert [(r["step"], r["nonfinite/skipped"]) for r in skipped] == [(2, 1), (2, 2)]
    assert "objective 'ic'" in skipped[0]["nonfinite/reason"]
    assert [r["train/nonfinite_skipped"] for r in rows if "train/loss" in r] == [0, 2, 2, 2]
    # always non-finite from step 2 on: two skips, then the run stops
    t = _tiny_run(tmp_path / "stop", "coca", "train.skip_nonfinite=2")
    _nan_from(t, "ic", lambda s, n: s >= 2, kind)
    with pytest.raises(NonFiniteLossError, match=r"step 2: objective 'ic' produced a non-finite "
                                                 r".*after skipping 2 batch\(es\).*step_00000002"):
        t.train()


# ---------------------------------------------------------------- untrusted files

class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(path, marker, listing=None):
    """Replace ``path`` with a malicious pickle and fix its hash in the listing, as an attacker would."""
    with open(path, "wb") as f:
        pickle.dump({"step": 1, "x": Payload(marker)}, f, protocol=2)
    if listing is not None:
        meta = json.loads(listing.read_text())
        files = meta["files"]
        entry = ckpt._sha256(path)
        files[path.name] = ({"sha256": entry, "bytes": path.stat().st_size}
                            if isinstance(files[path.name], dict) else entry)
        listing.write_text(json.dumps(meta))


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    # the payload works: a plain unpickle runs it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    _tiny_run(tmp_path / "run", "clip", "train.steps=2", "train.ckpt_every=1").train()
    c1, c = (tmp_path / "run" / "checkpoints" / f"step_0000000{i}" for i in (1, 2))
    export(c, tmp_path / "export")

    _plant(c / "state.pt", marker, c / "meta.json")
    with pytest.raises(CheckpointError, match=rf"{c / 'state.pt'} refused: it is not a weights-only file"):
        ckpt.load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="state.pt refused"):
        Trainer(load_config("clip", [*COMMON, f"train.run_dir={tmp_path / 'run'}"]), resume="latest",
                progress=False)
    _plant(c1 / "model.safetensors", marker, c1 / "meta.json")
    with pytest.raises(CheckpointError, match=rf"{c1 / 'model.safetensors'} is corrupt or unreadable"):
        finealign.load(c1)
    _plant(tmp_path / "export" / "model.safetensors", marker, tmp_path / "export" / "export.json")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'export' / 'model.safetensors'} is corrupt"):
        finealign.load(tmp_path / "export")
    hf = tmp_path / "hf"                                         # a Hugging Face dir with pytorch_model.bin
    hf.mkdir()
    _plant(hf / "pytorch_model.bin", marker)
    from finealign.interop.hf_clip import HFConversionError, read_hf_weights
    with pytest.raises(HFConversionError, match=rf"{hf}: cannot read the weights.*Weights only load failed"):
        read_hf_weights(hf)
    assert not marker.exists()


# ---------------------------------------------------------------- distributed: a rank dies

def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_dead_rank_fails_the_job_within_timeout_and_resume_works(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.5", "-m", "finealign", "train", "clip", "--no-progress", *COMMON,
           "data.batch_size=16", "train.steps=12", "train.dist_timeout=30", f"train.run_dir={run}"]
    with open(tmp_path / "log.txt", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        job.log_path = tmp_path / "log.txt"
        wait_for_step(job, run, 3)                               # the step-2 checkpoint exists
        workers = {_rank_of(p): p for p in _children(job.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        rc = job.wait(timeout=120)                              # a hang would fail here
    out = (tmp_path / "log.txt").read_text()
    assert rc != 0
    assert "SIGKILL" in out or "Signal 9" in out, out[-3000:]          # torchrun names the dead worker
    for p in workers.values():                                   # no orphan left behind
        assert not Path(f"/proc/{p}").exists() or Path(f"/proc/{p}/stat").read_text().split()[2] == "Z"
    start = latest_step(run)
    assert 2 <= start < 12
    res = subprocess.run([*cmd, "--resume", "latest"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {start}" in res.stderr
    assert latest_step(run) == 12 and logged_steps(run) == list(range(1, 13))
