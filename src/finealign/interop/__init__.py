"""Interoperability with other model formats (optional extra ``finealign[hf]`` where ``transformers`` is needed).

* ``hf_clip.py``  Hugging Face ``CLIPModel`` directories -> finealign's dual encoder (no ``transformers``
                  needed: config.json + safetensors are read directly).
* ``hf_text.py``  any Hugging Face text encoder (``AutoModel``) as the text tower (``model.text_tower: hf``).
* ``export.py``   ``finealign export``: a model as model.safetensors + config.yaml + tokenizer.json.
* ``model_dir_kind(path)`` tells which of finealign's loaders reads a directory (``finealign.load``).
"""
from __future__ import annotations

from pathlib import Path


def model_dir_kind(path: str | Path) -> str:
    """``"export"`` (finealign export), ``"hf"`` (a Hugging Face model dir: config.json, no config.yaml) or
    ``"checkpoint"`` (a run / checkpoint dir, or anything else: the checkpoint loader explains what is
    missing)."""
    from .export import is_export_dir
    p = Path(path)
    if is_export_dir(p):
        return "export"
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").exists():
        return "hf"
    return "checkpoint"
