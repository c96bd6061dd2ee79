"""Momentum (EMA) teacher and a MoCo/ALBEF-style feature queue.

    teacher = MomentumTeacher(student)                       # deep copy, every parameter requires_grad=False
    teacher = MomentumTeacher({"visual": model.visual,       # or a copy of selected submodules only
                               "fusion": model.fusion})      #   (an nn.ModuleDict with those keys)
    ...
    optimizer.step(); teacher.update()                        # t = m*t + (1-m)*s for parameters, s for buffers
    out = teacher(images)                                     # the copy's forward, under torch.no_grad()
    out = teacher.run("fusion", tokens, mask, patches)        # any submodule / method, under torch.no_grad()

Optimizer exclusion: the teacher's parameters all have ``requires_grad=False`` and ``update()`` writes them
in place under no_grad, so they never get a gradient. Keep the teacher as a submodule of the model (it
then moves with ``.to()`` and is saved in the model's state dict); ``train.optim.param_groups`` /
``build_optimizer`` skip parameters that do not require grad, so it never reaches AdamW. (Counting
parameters with ``trainable_only=False`` does include the teacher.)

The student is referenced, not registered: it is not a submodule of the teacher, so it is neither in
the teacher's state dict nor moved by it, and a model may hold a teacher of (parts of) itself without a
module cycle. Student and teacher parameters are paired by name on every ``update()``.

Checkpoints: the state dict holds only tensors (safetensors-compatible): the copy's parameters and buffers
and ``ema_momentum`` (float64, so a resumed run continues with the scheduled momentum even if the
schedule is not re-applied before the first update). ``FeatureQueue`` likewise keeps ``ptr`` / ``count``
as long buffers.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor


class MomentumTeacher(nn.Module):
    def __init__(self, student: nn.Module | Mapping[str, nn.Module], momentum: float = 0.995):
        super().__init__()
        if not isinstance(student, nn.Module):
            student = nn.ModuleDict(dict(student))                # a view of the selected submodules
        object.__setattr__(self, "_student", student)             # referenced, never registered
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.register_buffer("ema_momentum", torch.tensor(0.0, dtype=torch.float64))
        self.set_momentum(momentum)
        self.register_load_state_dict_post_hook(MomentumTeacher._sync_momentum)

    # ------------------------------------------------------------------ momentum

    @property
    def momentum(self) -> float:
        return self._momentum

    def set_momentum(self, m: float) -> None:
        """Momentum of the next updates (schedules call this every step); 1 = frozen, 0 = copy."""
        m = float(m)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {m}")
        self._momentum = m                                         # python copy: no device sync per update
        self.ema_momentum.fill_(m)

    @staticmethod
    def _sync_momentum(module: "MomentumTeacher", incompatible_keys) -> None:
        module._momentum = float(module.ema_momentum)

    # ------------------------------------------------------------------ EMA

    @property
    def student(self) -> nn.Module:
        return self._student

    def _pairs(self, named_t, named_s, kind: str) -> list[tuple[Tensor, Tensor]]:
        s = dict(named_s)
        pairs = []
        for name, t in named_t:
            if name not in s:
                raise KeyError(f"teacher {kind} {name!r} has no counterpart in the student")
            if s[name].shape != t.shape:
                raise ValueError(f"{kind} {name!r}: teacher {tuple(t.shape)} vs student {tuple(s[name].shape)}")
            pairs.append((t, s[name]))
        return pairs

    @torch.no_grad()
    def update(self, student: nn.Module | None = None) -> None:
        """EMA step: parameters t = m*t + (1-m)*s (one foreach lerp), buffers copied from the student.

        ``student`` defaults to the module (or submodule view) given at construction; another module
        with the same parameter names (e.g. the unwrapped model in a new process) may be passed.
        """
        student = self._student if student is None else student
        params = self._pairs(self.module.named_parameters(), student.named_parameters(), "parameter")
        t_float, s_float = [], []
        for t, s in params:
            s = s.detach()
            if t.is_floating_point():
                t_float.append(t)
                s_float.append(s if (s.dtype, s.device) == (t.dtype, t.device) else s.to(t.device, t.dtype))
            else:
                t.copy_(s)
        if t_float:
            # lerp(t, s, w) = t + w*(s - t) = m*t + (1-m)*s with w = 1-m; exact for m in {0, 1}
            torch._foreach_lerp_(t_float, s_float, 1.0 - self._momentum)
        for t, s in self._pairs(self.module.named_buffers(), student.named_buffers(), "buffer"):
            t.copy_(s)

    # ------------------------------------------------------------------ inference

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The copy's forward under torch.no_grad()."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def run(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the copy's submodule or method ``name`` (dotted: "visual", "encode_image", "fusion.forward")
        under torch.no_grad()."""
        fn: Any = self.module
        for part in name.split("."):
            fn = getattr(fn, part)
        with torch.no_grad():
            return fn(*args, **kwargs)


class FeatureQueue(nn.Module):
    """Ring buffer of the last ``size`` embeddings (ALBEF / MoCo): ``enqueue(x)`` after the loss,
    ``get()`` for the next step's negatives / distillation targets.

    ``get()`` returns a detached copy (oldest first), so a later in-place ``enqueue`` never invalidates a
    graph that used it. Only filled slots are returned (no random initial entries): (min(count, size), dim).
    Embeddings are stored as given: enqueue L2-normalised ones (e.g. the teacher's). For ids (ALBEF's
    idx_queue, SyncMask's item ids) use a second queue with ``dim=1, dtype=torch.long``, enqueued in step.

    Multi-GPU: the queue does not communicate. All-gather the batch's embeddings across ranks (rank order)
    and enqueue the gathered tensor on every rank, so that all ranks hold identical queues (then the
    checkpoint of rank 0 is valid for all, and DDP buffer broadcasting is a no-op; with large queues pass
    ``broadcast_buffers=False`` to DDP to avoid copying them every step).
    """

    def __init__(self, dim: int, size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))      # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))    # entries ever written
        self._ptr, self._count = 0, 0                                        # python copies: no syncs
        self.register_load_state_dict_post_hook(FeatureQueue._sync_pointers)

    @staticmethod
    def _sync_pointers(module: "FeatureQueue", incompatible_keys) -> None:
        module._ptr, module._count = int(module.ptr), int(module.count)

    def __len__(self) -> int:
        return min(self._count, self.size)

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """x (B, dim): written at the pointer, wrapping around; of a batch larger than the queue only the
        last ``size`` rows are kept."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) to enqueue, got {tuple(x.shape)}")
        B = x.shape[0]
        x = x.detach().to(self.queue.device, self.queue.dtype)
        if B > self.size:
            x, skip = x[-self.size:], B - self.size
        else:
            skip = 0
        n, p = x.shape[0], (self._ptr + skip) % self.size
        first = min(n, self.size - p)
        self.queue[p:p + first] = x[:first]
        if first < n:
            self.queue[:n - first] = x[first:]                               # wrap-around
        self._ptr, self._count = (p + n) % self.size, self._count + B
        self.ptr.fill_(self._ptr)
        self.count.fill_(self._count)

    def get(self) -> Tensor:
        """Stored embeddings, oldest first, as a new tensor: (len(self), dim)."""
        if self._count < self.size:
            return self.queue[:self._count].clone()
        return torch.cat([self.queue[self._ptr:], self.queue[:self._ptr]], dim=0)  # (size, dim)
