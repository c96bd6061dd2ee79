"""Multi-process training under the real launcher: ``torchrun --nproc_per_node 2 -m finealign train ...``
(gloo on CPU) gives the losses and the updated weights of one process on the concatenated batch."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finealign.config import load_config
from finealign.train.gather import StepGather
from finealign.train.logging import read_metrics
from finealign.train.loop import Trainer

COMMON = ["data.source=shapes", "data.num_samples=256", "data.batch_size=16", "train.log_every=1",
          "train.warmup=2", "train.steps=3", "train.device=cpu", "train.threads=1", "train.ckpt_every=0"]


def torchrun(recipe, run_dir, *extra, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "finealign", "train", recipe, *COMMON, *extra, f"train.run_dir={run_dir}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def single(recipe, run_dir, *extra):
    t = Trainer(load_config(recipe, [*COMMON, *extra, f"train.run_dir={run_dir}"]), progress=False)
    t.train()
    return t


def losses(run_dir):
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("/loss")} for r in read_metrics(run_dir)}


def final_weights(run_dir):
    ck = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(ck / "model.safetensors"))


def assert_same_run(one, two, atol=1e-5):
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-5, abs=1e-6), (step, k)
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra,alone", [
    ("clip", [], []),                                                       # no-grad gather, loss × world
    # + caption loss (a "local" loss: a mean of micro-batch means, so one process takes the same 4
    #   micro-batches of 4 that 2 ranks × 2 micro-batches make), accumulation, autograd gather
    ("coca", ["train.grad_accum=2", "train.gather_with_grad=true"], ["train.grad_accum=4"]),
    ("clip", ["train.gather_with_grad=true", "train.local_loss=true"], []),     # open_clip's local loss
    ("clip", ["train.strategy=fsdp"], []),                                  # FSDP2: sharded params / optimizer
], ids=["clip-ddp", "coca-accum-gather-grad", "clip-local-loss", "clip-fsdp"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, recipe, extra, alone):
    single(recipe, tmp_path / "one", *extra, *alone)
    res = torchrun(recipe, tmp_path / "two", *extra)
    assert res.stdout.count("run directory:") == 1                      # rank 0 prints, the other is quiet
    assert_same_run(tmp_path / "one", tmp_path / "two")
    # equal because both trained alike, not because neither moved: the seed's initial weights differ
    fresh = Trainer(load_config(recipe, [*COMMON, f"train.run_dir={tmp_path / 'fresh'}"]), progress=False)
    trained = final_weights(tmp_path / "two")
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.model.state_dict().items())


@pytest.mark.slow
def test_momentum_queues_match_across_ranks_and_one_process(tmp_path):
    """ALBEF ITC with momentum distillation and a feature queue: every rank enqueues the global batch,
    so the queue (and with it the loss) equals the single-process one."""
    extra = ["objectives.itm.weight=0", "objectives.mlm.weight=0", "masking.mlm={}", "model.queue_size=32",
             "objectives.itc.distill_warmup=0"]
    single("albef", tmp_path / "one", *extra)
    torchrun("albef", tmp_path / "two", *extra)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    q1, q2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    queue = [k for k in q1 if k.endswith("queue")]
    assert queue and all(torch.equal(q1[k], q2[k]) or torch.allclose(q1[k], q2[k], atol=1e-6) for k in queue)
    assert int(q2[[k for k in q2 if k.endswith("count")][0]]) == 3 * 16     # 3 steps × the global batch


def test_step_gather_layout_single_process():
    """One process: micro-batch substitution (the accumulation scheme); rows / offsets per pass."""
    g = StepGather()
    parts = [torch.full((2, 2), 0.0), torch.full((3, 2), 1.0)]        # micro_bounds(5, 2) = [0, 2, 5]
    g.start([5], 2, {"x": parts})
    local = torch.full((3, 2), 7.0, requires_grad=True)
    out, off = g("x", local, 1)
    assert off == 2 and out.shape == (5, 2) and out[2:].eq(7).all() and out[:2].eq(0).all()
    out.sum().backward()
    assert local.grad.eq(1).all()
    assert g.rows() == (0, 5) and g.loss_scale == 1.0 and g.owns_shared
    assert StepGather(1, 2).loss_scale == 2.0 and not StepGather(1, 2).owns_shared
    assert StepGather(1, 2, with_grad=True).loss_scale == 1.0
    same = torch.ones(4, 2)
    assert StepGather()("y", same, 0)[0] is same                      # nothing to gather: identity


@pytest.mark.parametrize("started", [True, False])
def test_exit_process_flushes_and_skips_the_shutdown_only_after_a_group(started):
    """After a multi-rank run the command ends with os._exit (no interpreter shutdown, where gloo's leftover
    worker threads can abort the process): the status, the buffered stdout and the log still arrive, and
    atexit handlers do not run. A single-process command exits normally, atexit included."""
    code = ("import atexit, logging, sys; from finealign import distributed as D\n"
            "atexit.register(lambda: sys.stdout.write(' atexit'))\n"
            f"D._started_group = {started}\n"
            "logging.basicConfig(format='%(message)s'); logging.getLogger('x').warning('logged')\n"
            "sys.stdout.write('buffered'); D.exit_process(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}      # stdout to a pipe: buffered
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 3
    assert res.stdout == ("buffered" if started else "buffered atexit")
    assert res.stderr.strip() == "logged"


def test_a_torchrun_group_makes_the_command_skip_the_shutdown(tmp_path):
    """Under a real 2-rank torchrun, init_distributed marks the process, so exit_process skips atexit."""
    script = tmp_path / "ranks.py"
    script.write_text("import atexit, os, pathlib; from finealign import distributed as D\n"
                      f"out = pathlib.Path({str(tmp_path)!r}) / ('atexit_' + os.environ['RANK'])\n"
                      "atexit.register(out.touch)\n"
                      "D.init_distributed(device='cpu'); D.barrier(); D.exit_process(0)\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(tmp_path.glob("atexit_*"))


def test_batch_must_split_into_ranks_and_micro_batches(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "finealign",
         "train", "clip", *COMMON, "data.batch_size=18", "train.grad_accum=2", f"train.run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "data.batch_size=18 is the global batch" in res.stderr
    assert "2 ranks × train.grad_accum=2" in res.stderr


@pytest.mark.slow
def test_timix_two_ranks_resume_reproduces_the_uninterrupted_run(tmp_path):
    """TiMix (PTA head, mixed ITC with soft labels across ranks) under torchrun; a run cut after its step-2
    checkpoint and resumed with --resume latest continues with exactly the uninterrupted losses
    (per-rank RNG states, loader position and mixing draws are restored)."""
    import shutil
    extra = ["train.steps=4", "train.ckpt_every=2"]
    torchrun("timix", tmp_path / "full", *extra)
    full = losses(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4] and "train/mixed_itc/loss" in full[1]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    (cut / "checkpoints" / "latest").write_text("step_00000002\n")
    rows = (cut / "metrics.jsonl").read_text().splitlines()[:2]
    (cut / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "finealign",
           "train", "--resume", "latest", "timix", *COMMON, *extra, f"train.run_dir={cut}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    resumed = losses(cut)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step]
