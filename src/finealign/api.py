"""Loading trained models: ``finealign.load(path)`` -> model, tokenizer and resolved config.

``path`` may be a run directory (its latest valid checkpoint, or ``which``), a checkpoint directory, an
export (``finealign export``, finealign/interop/export.py) or a Hugging Face CLIPModel directory
(finealign/interop/hf_clip.py). ``finealign.from_pretrained`` / ``finealign.Model.from_pretrained`` are the
same function under the names Hugging Face users look for (finealign/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, from_dict
from .models.factory import build_model
from .train import checkpoint as ckpt


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    config: Config
    path: Path

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Export: OUT_DIR/model.safetensors, config.yaml, tokenizer.json (``finealign export``)."""
        from .interop.export import export
        return export(self, out_dir, overwrite=overwrite)


def load(path: str | Path, device: str | torch.device = "cpu", which: str = "latest") -> Loaded:
    """Load a run / checkpoint directory, an exported directory or a Hugging Face CLIPModel directory."""
    from .data.tokenizer import Tokenizer
    from .interop import model_dir_kind
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a run or checkpoint directory, an export from "
                                f"`finealign export`, or a Hugging Face CLIPModel directory)")
    if p.is_file():
        if p.name == "latest" and p.parent.name == "checkpoints":      # the run's pointer file: follow it
            p = p.parent / p.read_text().strip()
        else:
            raise FileNotFoundError(f"{p} is a file: give the run, checkpoint or export directory ({p.parent})")
    kind = model_dir_kind(p)
    if kind == "export":
        from .interop.export import load_export
        return load_export(p, device)
    if kind == "hf":
        from .interop.hf_clip import load_hf_clip
        return load_hf_clip(p, device)
    if p.is_dir() and not _holds_checkpoints(p):
        if any((p / f).exists() for f in ("train.jsonl", "test.jsonl", "images", "train.csv")):
            what = "it looks like a dataset (pass it with --data / data.root)"
        elif (p / "config.yaml").exists() and (p / "metrics.jsonl").exists():
            what = "a run that has saved no checkpoint yet"
        else:
            what = f"it holds {', '.join(sorted(c.name for c in p.iterdir())[:6]) or 'nothing'}"
        raise FileNotFoundError(f"{p} is not a run, checkpoint, export or Hugging Face CLIPModel directory: {what}")
    ck = ckpt.find_checkpoint(p, which)
    state = ckpt.load_checkpoint(ck)            # verifies the files once; config and extra, no weights
    cfg = from_dict(state["config"])
    tok_json = (state.get("extra") or {}).get("tokenizer_json")
    if not tok_json:
        raise ckpt.CheckpointError(f"{ck}: checkpoint carries no tokenizer")
    tokenizer = Tokenizer.from_str(tok_json)
    model = build_model(cfg.model, tokenizer.vocab_size, full=cfg, tokenizer=tokenizer, pretrained=False)
    ckpt.load_weights(model, ck)
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, config=cfg, path=ck)


def _holds_checkpoints(p: Path) -> bool:
    """A run dir (checkpoints/ or step_* dirs) or a checkpoint dir (its name or its files say so)."""
    import json
    if (p / "checkpoints").is_dir() or ckpt.list_checkpoints(p) or ckpt.CKPT_RE.match(p.name):
        return True
    if (p / "model.safetensors").exists() or (p / "state.pt").exists():
        return True
    try:
        return "files" in json.loads((p / "meta.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", which: str = "latest") -> Loaded:
    """Same as :func:`load`."""
    return load(path, device=device, which=which)

