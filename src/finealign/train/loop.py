"""The training loop: config -> run directory with metrics, checkpoints and the resolved config.

One step = ``grad_accum`` micro-batches. "global" objectives (ITC) see every negative of the whole batch:
features of the other micro-batches are computed once without gradient and cached, and each micro-batch's
pass substitutes its own features (with gradient) into that cache, so summing the per-pass gradients of
the full-batch loss gives exactly the full-batch gradient (open_clip's accumulation scheme). "local"
objectives (IC, MIM, ...) are averaged over micro-batches.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .. import distributed as D
from ..config import Config
from ..config_checks import teacher_readers
from ..data.skips import SkipLog
from ..models.factory import build_model
from ..objectives import StepContext, build_objectives
from ..pipeline import Pipeline
from ..types import Batch
from . import checkpoint as ckpt
from .faults import NonFiniteGuard, NonFiniteLossError, blame_gradient, nonfinite_params
from .gather import StepGather, micro_bounds
from .host_memory import retain_freed_memory
from .logging import MetricLogger, NullLogger
from .optim import build_optimizer, build_scheduler
from .parallel import FSDP_OPTIM, Engine, compile_blocks
from .refresh import refresh_sampler
from .setup import build_tokenizer, build_train_loader, make_run_dir, pick_device, rank_zero_first

log = logging.getLogger("finealign")

__all__ = ["Trainer", "train", "seed_everything", "NonFiniteLossError"]   # the error: from faults.py


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True):
        cfg = copy.deepcopy(cfg)                 # the run's own: the caller's config is not filled in
        self.cfg = cfg
        self._closed = False
        self.progress = progress
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.retain_host_memory:
            retain_freed_memory()
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(tc.seed)                 # the same on every rank: identical initial weights
        self.dist = D.init_distributed(tc.device, tc.dist_timeout)
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.device = pick_device(tc.device, self.dist.local_rank)
        backbone = None
        if cfg.model.arch == "maccap" and not cfg.maccap.backbone and not resume:
            raise ValueError("model.arch=maccap trains over a frozen backbone: set maccap.backbone=RUN_OR_CHECKPOINT "
                             "(a CLIP / CoCa / SyCoCa run)")
        if cfg.maccap.backbone:                  # MacCap: the frozen backbone's model config and tokenizer
            from ..zeroshot.maccap import resolve_backbone
            cfg, backbone = resolve_backbone(cfg)
            self.cfg = cfg
        # rank 0 names the run dir (a timestamp) and writes the config; the others take its name
        name = D.broadcast_object(str(make_run_dir(cfg, resume)) if self.main else None)
        self.run_dir = Path(name)
        cfg.train.run_dir = name
        # the checkpoint a resume loads, found (and its files hashed) once
        path = ckpt.find_checkpoint(self.run_dir if resume == "latest" else resume, "latest") if resume else None
        with rank_zero_first(self.dist):         # rank 0 trains (or copies) the tokenizer first
            self.skips = SkipLog(strict=cfg.data.strict)
            # the tokenizer the weights were trained with: the backbone's (MacCap), or on a resume the
            # checkpoint's own copy when the run's tokenizer.json is gone (retraining a BPE would renumber)
            source = backbone if backbone is not None and not resume else path
            if (source is not None and self.main and not (self.run_dir / "tokenizer.json").exists()
                    and not cfg.tokenizer.path):
                # resolve_backbone (the trainer's load, for a resume) verifies these hashes: read without it
                (self.run_dir / "tokenizer.json").write_text(
                    ckpt.load_checkpoint(source, verify=False)["extra"]["tokenizer_json"])
            self.tokenizer = build_tokenizer(cfg, self.run_dir, self.skips)
        self.model = build_model(cfg.model, self.tokenizer.vocab_size, full=cfg, tokenizer=self.tokenizer)
        if backbone is not None and not resume:
            ckpt.load_weights(self.model.backbone, backbone)
        self.model.to(self.device)
        if getattr(self.model, "teacher", None) is not None and not teacher_readers(cfg) and self.main:
            log.warning("model.momentum=%s builds an EMA teacher that nothing in this config reads (readers: "
                        "objectives.itc.distill_alpha > 0, masking.sync, masking.relevance=attention, "
                        "objectives.agreement, model.mim_target=semantic): it runs every step for nothing; "
                        "set model.momentum=0", cfg.model.momentum)
        self.objectives = build_objectives(cfg.objectives).to(self.device)
        if not len(self.objectives):
            raise ValueError("no objective has a non-zero weight: nothing to train")
        needs = {r for o in self.objectives.values() for r in o.requires}
        if tc.compile:
            compile_blocks(self.model)
        self.engine = Engine(self.model, tc.strategy, self.dist, self.device)
        if self.dist.rank:                       # per-rank randomness (masks, dropout, mixing draws)
            seed_everything(tc.seed + 7919 * self.dist.rank)
        self.pipeline = Pipeline(self.model, cfg.masking, self.tokenizer, needs, mixer=cfg.mixer,
                                 total_steps=tc.steps, seed=tc.seed + 7919 * self.dist.rank)
        params = list(self.model.named_parameters()) + [
            (f"objectives.{n}", p) for n, p in self.objectives.named_parameters()]
        self.optimizer = build_optimizer(params, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.loader = build_train_loader(cfg, self.tokenizer, self.skips, self.dist, self.device)
        self.step = 0
        if resume:
            state = self.engine.load(path, self.optimizer, self.scheduler, map_location=self.device)
            if self.main:                        # loaded: the config this run now continues with
                (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            ranks = state["extra"].get("rng_ranks")
            if self.dist.rank and ranks and len(ranks) == self.dist.world_size:
                ckpt.set_rng_state(ranks[self.dist.rank])
            self.step = int(state["step"])
            if state.get("loader_state"):
                self.loader.load_state_dict(state["loader_state"])
            if state["extra"].get("objectives"):      # objectives' own state (e.g. SemMIM's EMA centres)
                self.objectives.load_state_dict(state["extra"]["objectives"])
        # the checkpoint this run resumed from counts as saved: a resumed run that has nothing left to
        # train does not rewrite it (which would drop the eval_*.json that `finealign eval` put beside it)
        self.last_checkpoint: Path | None = Path(path) if resume else None
        self.refreshes = 0                                 # semi-hard sampler refreshes in this process
        self.metrics = MetricLogger(self.run_dir, resume_step=self.step if resume else None) \
            if self.main else NullLogger()
        if resume:                               # after the metrics are cut back to the resumed step
            log.info("resumed from %s at step %d", path, self.step)
        self.nonfinite = NonFiniteGuard(tc.skip_nonfinite, skipped=state["extra"].get("nonfinite_skipped", 0)
                                        if resume else 0)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ one optimizer step
    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: Batch, rank_rows: list[int] | None = None) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch; ``rank_rows``: every rank's
        batch rows (multi-process; the trainer exchanges them before the step)."""
        tc = self.cfg.train
        accum = tc.grad_accum if self.dist.enabled else min(tc.grad_accum, len(batch))
        bounds = micro_bounds(len(batch), accum)
        micro = [batch.slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        gathered = sorted({g for o in self.objectives.values() if o.scope == "global" for g in o.gathers})
        cache: dict[str, list[torch.Tensor]] = defaultdict(list)
        if accum > 1 and gathered:
            with torch.no_grad(), self.autocast():
                for j, mb in enumerate(micro):
                    f = self.engine.run(self.pipeline.encode, mb, step=self.step, micro=j)
                    for g in gathered:
                        v = _feature(f, g)
                        if v is not None:                  # absent: e.g. mixed images after mixer.stop
                            cache[g].append(v.detach())
        gather = StepGather(self.dist.rank, self.dist.world_size, tc.gather_with_grad)
        gather.start(rank_rows or [len(batch)], accum, cache)
        out: dict[str, float] = defaultdict(float)
        bad_loss: tuple[str, float] | None = None     # (objective, value): the first non-finite loss
        self.model.train()
        for j, mb in enumerate(micro):
            ctx = StepContext(step=self.step, total_steps=tc.steps, gather_fn=lambda n, x, j=j: gather(n, x, j),
                              micro_index=j, steps_per_epoch=self.loader.batches_per_epoch or 0,
                              owns_shared=gather.owns_shared, reduce_mean=D.all_reduce_mean,
                              local_rows=gather.rows() if tc.local_loss and self.dist.enabled else None)
            with self.engine.sync(j == len(micro) - 1):
                with self.autocast():
                    feats = self.engine.run(self.pipeline, mb, step=self.step, micro=j)
                    total = 0.0
                    for name, obj in self.objectives.items():
                        res = obj(feats, mb, ctx)
                        loss = res["loss"]
                        if bad_loss is None and not torch.isfinite(loss):
                            # backward still runs: every rank reaches the decision below together
                            bad_loss = (name, float(loss.detach()))
                        share = gather.loss_scale if obj.scope == "global" else 1.0 / accum
                        total = total + obj.weight * share * loss
                        for k, v in res.items():
                            out[f"{name}/{k}"] += float(v.detach()) / accum
                total.backward()
        self.engine.finish_backward()
        # per-objective losses are micro-batch means (a global loss has the same value in every pass)
        out["loss"] = sum(obj.weight * out[f"{n}/loss"] for n, obj in self.objectives.items())
        # the global gradient norm (clipped when train.clip_grad > 0; max_norm=inf scales by exactly 1)
        gn = torch.nn.utils.clip_grad_norm_(self._params(), tc.clip_grad if tc.clip_grad > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn          # FSDP: a DTensor
        if self._nonfinite_step(bad_loss, gn, micro):
            return {"skipped": self.nonfinite.skipped, "reason": self.nonfinite.last}
        out["grad_norm"] = float(gn)
        self.optimizer.step()
        if hasattr(self.model, "momentum_update"):              # EMA teachers follow the new weights
            self.model.momentum_update(**({"gather": D.all_gather} if self.dist.enabled else {}))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return dict(out)

    def _nonfinite_step(self, bad_loss, grad_norm, micro) -> bool:
        """True: skip this batch (no optimizer step); raises NonFiniteLossError past train.skip_nonfinite."""
        flag = float(bad_loss is not None)
        if self.dist.enabled:                       # a local objective may be non-finite on one rank only
            t = torch.tensor([flag], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = float(t)
        if not flag and torch.isfinite(grad_norm):
            return False
        if bad_loss is not None:
            what = f"objective {bad_loss[0]!r} produced a non-finite loss ({bad_loss[1]})"
        elif flag:
            what = "another rank's objective produced a non-finite loss (named in that rank's log)"
        else:
            params = nonfinite_params(self.model.named_parameters())
            blamed = blame_gradient(self, micro) if not self.dist.enabled else []
            what = (f"objective {', '.join(map(repr, blamed)) if blamed else '(not traced)'} produced a "
                    f"non-finite gradient (norm {float(grad_norm)}; in {', '.join(params) or 'objective parameters'})")
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.handle(self.step, what, self.last_checkpoint)
        return True

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ the loop
    def save(self) -> Path:
        """Checkpoint (every rank calls it: FSDP gathers the weights, every rank's RNG state is kept);
        rank 0 writes it."""
        model, optimizer = self.engine.model_state(), self.engine.optimizer_state(self.optimizer)
        extra = {"tokenizer_json": self.tokenizer.to_str(),
                 "objectives": {k: v.cpu() for k, v in self.objectives.state_dict().items()}}
        if self.nonfinite.skipped:
            extra["nonfinite_skipped"] = self.nonfinite.skipped
        if self.dist.enabled:
            extra["rng_ranks"] = D.all_gather_object(ckpt.get_rng_state())   # one per rank
        if self.engine.kind == "fsdp":
            extra["optimizer_format"] = FSDP_OPTIM
        loader_state = self.loader.state_dict()
        if self.dist.enabled and getattr(self.loader, "stream_mode", None) in ("split", "resample"):
            loader_state = D.all_gather_object(loader_state)      # each rank reads its own shards
        path = None
        if self.main:
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, model, self.cfg.to_dict(), optimizer, self.scheduler,
                loader_state=loader_state, extra=extra, keep=self.cfg.train.keep)
        self.last_checkpoint = Path(D.broadcast_object(str(path) if path else None))
        return self.last_checkpoint

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self, until: int | None = None) -> Path:
        """Train to ``train.steps`` (or stop early at step ``until``, checkpointed, as if interrupted)."""
        if self._closed:
            raise RuntimeError("this Trainer has finished (its logs are closed): build a new one with "
                               "resume='latest' to train further")
        tc = self.cfg.train
        last = min(tc.steps, until) if until is not None else tc.steps
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for s in handlers:
                signal.signal(s, self._on_signal)
        except ValueError:  # not in the main thread
            handlers = {}
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        it = iter(self.loader)
        epoch = getattr(self.loader, "epoch", 0)
        t0, seen = time.perf_counter(), 0
        epoch_skips = SkipLog()
        refreshed_at = None
        try:
            while self.step < last:
                if refreshed_at != self.step and self.loader.needs_refresh(self.step):
                    self.refresh_sampler()
                    refreshed_at = self.step
                batch = next(it)
                ep = getattr(self.loader, "epoch", 0)
                if ep != epoch:                  # this batch opens a new epoch: the last one is complete
                    if epoch_skips.total:
                        log.warning("epoch %d: %s", epoch, epoch_skips.summary())
                    epoch, epoch_skips = ep, SkipLog()
                self.skips.update(batch.skipped)
                epoch_skips.update(batch.skipped)
                rows = [len(batch)]
                if self.dist.enabled:            # every rank's rows: a step runs only if all have enough
                    rows = [int(r) for r in torch.cat(D.all_gather(torch.tensor([len(batch)], device=self.device)))]
                if min(rows) < (tc.grad_accum if self.dist.enabled else 1):
                    if self.dist.enabled:
                        log.warning("step %d: a rank's batch has %d usable sample(s) (< train.grad_accum): "
                                    "batch skipped on every rank", self.step + 1, min(rows))
                    continue
                batch = batch.to(self.device, non_blocking=True)
                metrics = self.train_step(batch, rows)
                if "loss" not in metrics:        # a non-finite batch skipped (train.skip_nonfinite)
                    self.metrics.log(self.step + 1, metrics, prefix="nonfinite")
                    continue
                self.step += 1
                seen += sum(rows)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    metrics = self._mean_over_ranks(metrics)
                    dt = time.perf_counter() - t0
                    metrics["samples_per_s"] = seen / max(dt, 1e-9)
                    metrics["skipped"] = self.skips.total
                    metrics["nonfinite_skipped"] = self.nonfinite.skipped
                    self.metrics.log(self.step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
                    t0, seen = time.perf_counter(), 0
                bar.update(1)
                if tc.ckpt_every and self.step % tc.ckpt_every == 0:
                    self.save()
                if tc.eval_every and self.step % tc.eval_every == 0:
                    self.evaluate_val()
                if self._stop_requested():
                    path = self.save()
                    log.warning("received signal %d: saved %s and stopped at step %d",
                                self._stop_signal, path, self.step)
                    break
            else:
                if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                    self.save()
        finally:
            bar.close()
            self.metrics.close()
            self._closed = True
            if epoch_skips.total:                # the epoch the run ended in, as far as it got
                log.warning("epoch %d (to step %d): %s", epoch, self.step, epoch_skips.summary())
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.dist.enabled:                    # every rank's skips in the run's record
            merged = SkipLog()
            for other in D.all_gather_object(self.skips):
                merged.update(other)
            self.skips = merged
        if self.skips.total and self.main:
            log.warning("whole run: %s", self.skips.summary())
        if self.main:
            (self.run_dir / "skipped.yaml").write_text(yaml.safe_dump(self.skips.to_dict()))
        D.barrier()
        return self.run_dir

    def _stop_requested(self) -> bool:
        """A signal reached this process (or, multi-process, any rank): all ranks stop at the same step."""
        flag = float(self._stop_signal is not None)
        if self.dist.enabled:
            t = torch.tensor([flag], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = float(t)
            if flag and self._stop_signal is None:
                self._stop_signal = -1
        return bool(flag)

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Logged numbers are rank means (global losses are equal on every rank; local ones differ)."""
        if not self.dist.enabled:
            return metrics
        keys = sorted(metrics)
        t = D.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                           device=self.device))
        return dict(zip(keys, t.tolist()))

    def refresh_sampler(self) -> dict[str, float]:
        """Re-embed the training pairs (``data.refresh_embed``) for the semi-hard sampler; the
        embeddings apply from the next batch. Logs ``sampler/*`` metrics."""
        d = self.cfg.data
        with self.engine.unsharded():    # multi-process: rank 0 embeds, every rank gets its embeddings
            res = refresh_sampler(self.model, self.loader, d.refresh_embed, tokenizer=self.tokenizer,
                                  context_length=self.cfg.model.context_length,
                                  image_size=self.cfg.model.image_size, device=self.device,
                                  batch_size=d.eval_batch_size, workers=d.workers, autocast=self.autocast,
                                  progress=self.progress, compute=self.main,
                                  share=D.broadcast_tensor if self.dist.enabled else None)
        self.refreshes += 1
        self.metrics.log(self.step, res, prefix="sampler")
        return res

    def evaluate_val(self) -> dict:
        from ..eval.runner import evaluate
        with self.engine.unsharded():    # every rank evaluates its share (eval/runner.py)
            res = evaluate(self.model, self.tokenizer, self.cfg, split=self.cfg.data.val, tasks=["retrieval"],
                           device=self.device, progress=False)
        self.metrics.log(self.step, res.get("retrieval", {}), prefix="val")
        self.model.train()
        return res


def _feature(feats, name):
    v = getattr(feats, name, None)
    return v if v is not None else feats.extras.get(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, resume: str | None = None, progress: bool = True) -> Path:
    return Trainer(cfg, resume=resume, progress=progress).train()
