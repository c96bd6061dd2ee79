"""Atomic, verifiable training checkpoints.

Layout::

    run_dir/checkpoints/
        latest                      # text file: "step_00001200\\n" (replaced atomically)
        step_00001000/
        step_00001200/
            model.safetensors       # weights (tied / aliased tensors stored once, see below)
            config.yaml             # resolved config (yaml.safe_dump)
            state.pt                # optimizer, scheduler, RNG, loader position, step, extra
            meta.json               # {"step", "files": {name: {"sha256", "bytes"}}}: written LAST

Atomicity: files go to a hidden ``checkpoints/.tmp-<name>-<pid>-<rand>/``, are fsynced (files, then dir),
and the dir is ``os.replace``-d into place; a crash leaves the complete new checkpoint or none (``.tmp-*``
leftovers are never read and are removed by the next save). ``meta.json`` holds every file's sha256, so
truncation or bit rot is detected later (:func:`verify_checkpoint`).

``state.pt`` is read with ``torch.load(weights_only=True)``: on save, numpy values are converted (arrays ->
tensors, scalars -> numbers) and anything else that is not a tensor / number / string / container is
rejected with a TypeError naming where it sits. Tied weights (safetensors refuses shared memory) are
stored once, the other names listed in the file's ``"aliases"`` metadata and restored on load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["CheckpointError", "CheckpointWriteError", "save_checkpoint", "find_checkpoint", "load_checkpoint", "verify_checkpoint",
           "load_config_from_checkpoint", "list_checkpoints", "get_rng_state", "set_rng_state",
           "load_weights", "read_weights", "read_state"]

from .rng import get_rng_state, set_rng_state  # noqa: F401  (re-exported: part of the checkpoint API)
from .ckpt_io import (_dedup_state_dict, _sha256, _weights_only_safe, _write_text_atomic,  # noqa: F401
                      fsync_path)  # (_sha256, _dedup_state_dict: used by interop/export.py and serve/)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.yaml", "state.pt")
CKPT_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class CheckpointWriteError(CheckpointError):
    """Saving failed (an OSError: full disk, I/O error); the message names the checkpoint that could not be
    written and the previous one, which is untouched."""


# ---------------------------------------------------------------- helpers

def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _to_plain_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


# ---------------------------------------------------------------- save

def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, config_dict: Any,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    loader_state: Any = None, extra: dict | None = None, keep: int = 3) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}/`` atomically, update ``latest``, prune to ``keep``.

    Args:
        run_dir: the run directory (``checkpoints/`` is created inside it).
        step: optimizer steps done so far.
        model: module (DDP / torch.compile wrappers are unwrapped).
        config_dict: resolved config (dict, dataclass or object with ``to_dict``), YAML-safe.
        optimizer, scheduler: saved via their ``state_dict()`` when given.
        loader_state: data loader position (anything weights_only-safe, numpy is converted).
        extra: free-form weights_only-safe dict (metrics, tokenizer hash, ...).
        keep: number of checkpoints kept (highest steps; the one just written is never deleted);
            ``<= 0`` keeps all.
    Returns:
        Path of the new checkpoint directory.
    """
    step = int(step)
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name

    # serialise everything that can fail on bad input before touching the disk
    weights, aliases = _dedup_state_dict(_unwrap(model).state_dict())
    config_text = yaml.safe_dump(_to_plain_dict(config_dict), sort_keys=False)
    state = _weights_only_safe({
        "format_version": FORMAT_VERSION, "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": get_rng_state(), "loader_state": loader_state, "extra": dict(extra or {}),
    }, "state")

    try:
        _write_checkpoint(ckpt_root, name, step, weights, aliases, config_text, state)
    except OSError as e:                # ENOSPC, EIO, ...: the previous checkpoint and `latest` are intact
        prev = [p.name for p in list_checkpoints(ckpt_root) if p.name != name]
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {e}; nothing of it was kept, the previous checkpoint "
            f"({ckpt_root / prev[-1] if prev else 'none'}) is intact and `latest` still names it") from e
    _prune(ckpt_root, keep, protect=final)
    return final


def _write_checkpoint(ckpt_root: Path, name: str, step: int, weights: dict, aliases: dict, config_text: str,
                      state: dict) -> None:
    """Temp dir -> fsync files + dir -> rename -> fsync parent -> replace `latest` (fsynced)."""
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "finealign_step": str(step), "aliases": json.dumps(aliases)})
        (tmp / "config.yaml").write_text(config_text)
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
        files = {}
        for fname in FILES:
            fsync_path(tmp / fname)
            files[fname] = {"sha256": _sha256(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        meta = {"format_version": FORMAT_VERSION, "step": step, "files": files,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if final.exists():              # re-saving a step: move the old one aside first
            old = ckpt_root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _write_text_atomic(ckpt_root / "latest", name + "\n")
    except BaseException:               # `latest` must not name a checkpoint other than a complete one:
        shutil.rmtree(final, ignore_errors=True)    # drop the new one, the old `latest` stays valid
        raise


def _prune(ckpt_root: Path, keep: int, protect: Path) -> None:
    for p in ckpt_root.iterdir():       # leftovers of crashed saves
        if p.is_dir() and p.name.startswith((".tmp-", ".old-")) and f"-{os.getpid()}-" not in p.name:
            shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    ckpts = list_checkpoints(ckpt_root)
    others = [p for p in ckpts if p.name != protect.name]
    for p in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- find / verify

def list_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (``step_XXXXXXXX``) under a run dir or its ``checkpoints/``, oldest first."""
    root = Path(path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)),
                  key=lambda p: int(p.name[5:]))


def verify_checkpoint(ckpt: str | os.PathLike, files: tuple[str, ...] = FILES) -> dict:
    """Check ``meta.json`` and size + sha256 of ``files``; returns meta or raises CheckpointError naming the file."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: incomplete checkpoint (meta.json is written last)")
    try:
        meta = json.loads(meta_path.read_text())
        listed = meta["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from None
    for fname in files:
        path = ckpt / fname
        if fname not in listed:
            raise CheckpointError(f"{path} is not listed in {meta_path}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != listed[fname]["bytes"]:
            raise CheckpointError(f"{path} is corrupt: {size} bytes, expected {listed[fname]['bytes']} (truncated?)")
        if _sha256(path) != listed[fname]["sha256"]:
            raise CheckpointError(f"{path} is corrupt: sha256 differs from {meta_path}")
    return meta


def _is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "meta.json").exists() or (p / "model.safetensors").exists() or bool(CKPT_RE.match(p.name)))


def find_checkpoint(path_or_run_dir: str | os.PathLike, which: str | int = "latest") -> Path:
    """Resolve a checkpoint directory.

    Args:
        path_or_run_dir: a checkpoint dir (returned as is; :func:`load_checkpoint` verifies it), a run
            dir, or a run's ``checkpoints/`` dir.
        which: ``"latest"`` (the dir named in ``checkpoints/latest``; if that is missing or fails
            :func:`verify_checkpoint`, a warning names the bad file and the newest *valid* checkpoint
            is used instead), or a step (``1200``, ``"1200"``, ``"step_00001200"``), verified.
    Raises:
        CheckpointError naming the directory or the bad files when nothing valid is found.
    """
    p = Path(path_or_run_dir)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if _is_checkpoint_dir(p) and not (p / "checkpoints").is_dir():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    ckpts = list_checkpoints(root)

    if str(which) != "latest":
        m = re.fullmatch(r"(?:step_)?(\d+)", str(which))
        if not m:
            raise CheckpointError(f"which must be 'latest' or a step, got {which!r}")
        target = root / f"step_{int(m.group(1)):08d}"
        if not target.is_dir():
            raise CheckpointError(f"{target} does not exist (have: {[c.name for c in ckpts]})")
        verify_checkpoint(target)
        return target

    errors: list[str] = []
    candidates = list(reversed(ckpts))               # newest first
    latest_file = root / "latest"
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named.is_dir():
            candidates = [named] + [c for c in candidates if c != named]
        else:
            log.warning("%s names %s, which does not exist; using the newest valid checkpoint", latest_file, named)
    for i, c in enumerate(candidates):
        try:
            verify_checkpoint(c)
        except CheckpointError as e:
            log.warning("skipping invalid checkpoint: %s", e)
            errors.append(str(e))
            continue
        if i > 0:
            log.warning("falling back to checkpoint %s", c)
        return c
    if not errors:
        raise CheckpointError(f"no checkpoint found in {root}")
    raise CheckpointError(f"no valid checkpoint in {root}: " + "; ".join(errors))


# ---------------------------------------------------------------- load

def read_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """The state dict in a ``model.safetensors`` file (tied weights restored from its aliases)."""
    try:
        sd = load_file(str(path), device=device)
        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:                                  # safetensors raises its own error types
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from e
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    return sd


def _load_weights(model: nn.Module, path: Path, map_location: Any) -> None:
    device = str(torch.device(map_location)) if isinstance(map_location, (str, torch.device)) else "cpu"
    sd = read_weights(path, device)
    model = _unwrap(model)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        def fmt(names: list[str]) -> str:
            return ", ".join(names[:20]) + (f" ... (+{len(names) - 20})" if len(names) > 20 else "")
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: "
                              f"missing keys [{fmt(missing)}]; unexpected keys [{fmt(unexpected)}]")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:                               # shape mismatches
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {e}") from e


def load_weights(model: nn.Module, ckpt: str | os.PathLike, map_location: Any = "cpu") -> None:
    """Only the weights of checkpoint dir ``ckpt`` into ``model`` (strict; no verification, no state.pt)."""
    _load_weights(model, Path(ckpt) / "model.safetensors", map_location)


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    map_location: Any = "cpu", restore_rng: bool = False, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint (dir, or run dir -> :func:`find_checkpoint` ``"latest"``) into the given objects.

    Args:
        model: weights are loaded strictly (missing / unexpected keys -> CheckpointError listing them).
        optimizer, scheduler: restored from ``state.pt`` (CheckpointError if it holds none).
        map_location: device for weights and optimizer tensors (``"cpu"``, ``"cuda:0"``, torch.device).
        restore_rng: also restore Python / numpy / torch (/ CUDA) RNG states.
        verify: check sha256 of every file against ``meta.json`` first.
    Returns:
        ``{"step": int, "config": dict, "loader_state": Any, "extra": dict, "path": Path}``.
    """
    given = Path(path)
    ckpt = find_checkpoint(given)
    if verify and ckpt == given:       # run dirs were already verified by find_checkpoint
        verify_checkpoint(ckpt)
    state_path = ckpt / "state.pt"
    state = read_state(state_path, map_location)
    config = load_config_from_checkpoint(ckpt, verify=False)
    if model is not None:
        _load_weights(model, ckpt / "model.safetensors", map_location)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if state.get(key) is None:
            raise CheckpointError(f"{state_path} holds no {key} state (saved without one)")
        try:
            obj.load_state_dict(state[key])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{state_path}: cannot restore {key}: {e}") from e
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    return {"step": int(state["step"]), "config": config, "loader_state": state.get("loader_state"),
            "extra": state.get("extra") or {}, "path": ckpt}


def read_state(state_path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``state.pt`` through ``torch.load(weights_only=True)``: a pickle that would build anything but tensors,
    numbers, strings and containers (code that runs on load) is refused, never executed."""
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{state_path} refused: it is not a weights-only file (its pickle would build "
                              f"objects or run code on load; not unpickled): {e}") from None
    except Exception as e:
        raise CheckpointError(f"{state_path} is corrupt or unreadable: {e}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{state_path} is not a finealign training state (no 'step')")
    return state


def load_config_from_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """The resolved config dict stored with a checkpoint (dir or run dir -> latest valid)."""
    ckpt = find_checkpoint(path)
    cfg_path = ckpt / "config.yaml"
    if verify:
        verify_checkpoint(ckpt, files=("config.yaml",))
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{cfg_path} is missing or corrupt: {e}") from e
    return data or {}
