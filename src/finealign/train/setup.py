"""Building the pieces a run needs: run directory, device, tokenizer, training loader."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from ..config import Config
from ..data.skips import SkipLog

log = logging.getLogger("finealign")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available (device ``local_rank``: one GPU per process under torchrun), else CPU.
    A device this machine lacks (or a name torch does not know) is a ConfigError naming ``train.device``."""
    from ..config import ConfigError
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise ConfigError(f"train.device={name} but this machine has no {dev.type} device; use train.device=cpu "
                          f"(or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


@contextlib.contextmanager
def rank_zero_first(dist):
    """Rank 0 runs the block first (e.g. writes the tokenizer), then the other ranks (which read it)."""
    from .. import distributed as D
    if dist.enabled and not dist.is_main:
        D.barrier()
    try:
        yield
    finally:
        if dist.enabled and dist.is_main:
            D.barrier()


def make_run_dir(cfg: Config, resume: str | None) -> Path:
    """``train.run_dir`` or a new ``runs/<recipe>-<timestamp>[-N]``. A new run writes its resolved config
    there; a resumed one leaves config.yaml to the trainer, which writes it once the checkpoint has loaded
    (a resume that fails leaves the run as it was). A new run into a directory that holds checkpoints is
    refused: it would mix two runs' checkpoints and metrics."""
    from ..config import ConfigError
    from . import checkpoint as ckpt
    if cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir).expanduser()
    elif resume and resume != "latest":
        p = Path(resume)
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p
    else:
        if resume == "latest":
            raise ConfigError("--resume latest needs train.run_dir=DIR (the run to continue)")
        run_dir = _new_run_dir(Path("runs"), (cfg.recipe or "run").replace("/", "-"))
    if resume:
        check_resumable(cfg, run_dir if resume == "latest" else Path(resume))
    elif run_dir.is_file():
        raise ConfigError(f"train.run_dir={run_dir} is a file, not a directory")
    elif found := ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"train.run_dir={run_dir} already holds a run (checkpoints up to {found[-1].name}): "
                          f"continue it with `finealign train --resume {run_dir}`, or choose a new train.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.run_dir = str(run_dir)
    if not resume:
        # a tokenizer left by an earlier attempt that saved no checkpoint may come from other (or no) data
        (run_dir / "tokenizer.json").unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def _new_run_dir(parent: Path, name: str) -> Path:
    """``parent/name-<timestamp>``, created here; runs started in the same second get ``-2``, ``-3``, ..."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = parent / (f"{name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free run directory name for {name}-{stamp}")


#: optimizer settings a resume restores from the checkpoint's optimizer / scheduler state
RESTORED = ("lr", "weight_decay", "beta1", "beta2", "eps")


def check_resumable(cfg: Config, where: Path) -> None:
    """Refuse, before anything is written, a resume whose config changes what the checkpoint fixes: the
    model and tokenizer (``model.*``, ``tokenizer.*``: the weights would not load, or would read other token
    ids) and what the optimizer state restores (``train.lr`` etc.: it would silently not apply). Reads the
    newest checkpoint's config without hashing its files (the trainer's load verifies them); a missing
    checkpoint is left to that load's own error."""
    from ..config import ConfigError
    from . import checkpoint as ckpt
    try:
        found = ckpt.list_checkpoints(where)            # a run dir; a checkpoint dir is taken as it is
        saved = ckpt.load_config_from_checkpoint(found[-1] if found else where, verify=False)
    except (ckpt.CheckpointError, FileNotFoundError):
        return
    changed = [f"{section}.{k} ({v!r} -> {getattr(getattr(cfg, section), k)!r})"
               for section in ("model", "tokenizer") for k, v in (saved.get(section) or {}).items()
               if hasattr(getattr(cfg, section), k) and v != getattr(getattr(cfg, section), k)]
    if changed:
        raise ConfigError(f"--resume continues the checkpoint's model, so {', '.join(changed)} cannot change; "
                          f"resume with the run's values (or start a new run)")
    train = saved.get("train") or {}
    changed = [f"train.{k} ({train[k]} -> {getattr(cfg.train, k)})" for k in RESTORED
               if k in train and float(train[k]) != float(getattr(cfg.train, k))]
    if changed:
        raise ConfigError(f"--resume restores the optimizer and schedule state, so {', '.join(changed)} would not "
                          f"apply; resume with the run's values (or start a new run)")


def build_tokenizer(cfg: Config, run_dir: Path, skips: SkipLog):
    """Load ``tokenizer.path``, or the run's own tokenizer.json, or train a BPE on the training captions."""
    from ..data.loader import build_source
    from ..data.tokenizer import Tokenizer
    own = run_dir / "tokenizer.json"
    if cfg.tokenizer.path:
        return Tokenizer.load(cfg.tokenizer.path)
    if own.exists():
        return Tokenizer.load(own)
    read = SkipLog(strict=cfg.data.strict)
    samples = build_source(cfg.data, "train", read)
    count = 0

    def captions():
        nonlocal count
        for i, s in enumerate(samples):
            count += len(s.captions)
            yield from s.captions
            if i >= 200_000:  # enough text for a BPE vocabulary; streaming sources may be endless
                break
    log.info("training a %d-token BPE tokenizer on the training captions", cfg.tokenizer.vocab_size)
    tok = Tokenizer.train(captions(), vocab_size=cfg.tokenizer.vocab_size, lowercase=cfg.tokenizer.lowercase)
    if not count:
        why = read.reasons() or "it is empty"
        raise ValueError(f"no training captions to build a tokenizer from: split {cfg.data.train!r} of data.source="
                         f"{cfg.data.source} (data.root={cfg.data.root}) gave none (skipped: {why})")
    tok.save(own)
    return tok


def build_train_loader(cfg: Config, tokenizer, skips: SkipLog, dist=None, device="cpu"):
    """This rank's training loader (``data.batch_size`` is the global batch; see docs/scaling.md)."""
    from ..data.loader import TrainLoader, build_source
    samples = build_source(cfg.data, "train", skips)
    ranks = {}
    if dist is not None and dist.enabled:
        per_rank = cfg.data.batch_size // dist.world_size
        if cfg.data.batch_size % dist.world_size or per_rank % cfg.train.grad_accum:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is the global batch: it must split into "
                             f"{dist.world_size} ranks × train.grad_accum={cfg.train.grad_accum} micro-batches")
        from ..data.train_loader import rank_agreement
        ranks = {"rank": dist.rank, "world_size": dist.world_size, "agree": rank_agreement(device)}
    return TrainLoader(samples, tokenizer, cfg.data, cfg.model.image_size, cfg.model.context_length, **ranks)
