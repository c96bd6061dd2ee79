"""train.retain_host_memory: after retain_freed_memory(), the large tensors of a training step reuse the
pages freed by the step before (no page faults once the heap has settled); without it glibc unmaps them
and every step faults each page in again. Each case runs in its own interpreter (the setting is
process-wide and cannot be undone)."""
import os
import platform
import subprocess
import sys

import pytest

from finealign.config import load_config

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")

PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")        # of one (2048, 8192) fp32 tensor

PROBE = r"""
import resource, sys, torch
from finealign.train.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else None
torch.manual_seed(0)
head, x = torch.nn.Linear(64, 8192), torch.randn(2048, 64)     # a caption head: 64 MB of fp32 logits
def step():
    head(x).logsumexp(-1).mean().backward()
for _ in range(30):                     # the heap settles: every block size has a free block to reuse
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(retain: bool, env_extra=None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if retain else "0"], env=env, text=True,
                         capture_output=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, faults = _probe(True)
    plain_applied, plain_faults = _probe(False)
    assert applied == "True" and plain_applied == "None"
    assert plain_faults >= 5 * PAGES                # glibc mmaps and unmaps (at least) the 64 MB logits
    # the same heap pages step after step (a settled heap still re-faults one 64 MB block now and then)
    assert faults <= max(plain_faults / 10, PAGES)


def test_user_malloc_environment_is_left_alone():
    applied, faults = _probe(True, {"MALLOC_MMAP_THRESHOLD_": str(1 << 30)})
    assert applied == "False"
    # no mmap, but glibc still trims the heap: most steps fault the logits in again (a tuned process faults
    # at most one such block in 5 steps, above)
    assert faults >= 2 * PAGES


def test_the_trainer_tunes_malloc_unless_told_not_to(tmp_path, monkeypatch):
    from finealign.train import loop
    calls = []
    monkeypatch.setattr(loop, "retain_freed_memory", lambda: calls.append(1))   # process-wide: only count
    base = ["model.preset=tiny", "data.source=shapes", "data.num_samples=16", "data.batch_size=8",
            "train.steps=1", "train.device=cpu"]
    assert load_config("coca").train.retain_host_memory is True                 # on by default
    loop.Trainer(load_config("clip", [*base, f"train.run_dir={tmp_path / 'a'}"]), progress=False)
    assert calls == [1]
    loop.Trainer(load_config("clip", [*base, f"train.run_dir={tmp_path / 'b'}", "train.retain_host_memory=false"]),
                 progress=False)
    assert calls == [1]
