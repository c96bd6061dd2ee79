"""Low-level checkpoint I/O: weights_only-safe state, safetensors-ready state dicts, durable writes.

Every write that must survive a crash goes through here: files are fsynced, then renamed, then their
directory is fsynced (:func:`fsync_path`, :func:`write_text_atomic`), so after a power loss a name points
either to the old complete file or to the new complete one. Write errors (a full disk: ``ENOSPC``) propagate
as ``OSError``; :func:`finealign.train.checkpoint.save_checkpoint` turns them into a
:class:`~finealign.train.checkpoint.CheckpointWriteError` naming the checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _weights_only_safe(obj: Any, where: str) -> Any:
    """Copy of ``obj`` that ``torch.load(weights_only=True)`` accepts, or TypeError naming ``where``."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.Size,
                                       torch.device)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _weights_only_safe(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _weights_only_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(items) if type(obj) in (list, tuple, set) else list(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    f"torch.load(weights_only=True) cannot read; store plain numbers/strings/tensors/containers")


def _dedup_state_dict(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop exact aliases (tied weights) and copy partial overlaps so safetensors accepts the dict."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in sd.items():
        t = t.detach()
        if t.numel() == 0:
            kept[name] = t.cpu().contiguous()
            continue
        ptr = t.untyped_storage().data_ptr()
        view = (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        if ptr in storages:
            t = t.clone()              # overlaps another kept tensor's storage: store a private copy
        storages.add(ptr)
        t = t.cpu()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        kept[name] = t if whole else t.contiguous().clone()   # views of larger buffers: own copy
    return kept, aliases


def fsync_path(path: Path) -> None:
    """fsync a file (errors propagate) or a directory (best effort: not possible on every OS)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not is_dir:
            raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
