"""Data sources, one file each, registered in ``finealign.registry.SOURCES``.

A source is a function ``build(cfg: DataConfig, split: str, skips: SkipLog) -> Sequence[Sample] | Iterable[Sample]``:
map-style sources return a sequence (``__len__``/``__getitem__``), streaming ones (webdataset) an iterable.
Rows that cannot be parsed are reported through ``skips.skip(reason, "file:line")`` (raises under strict).
Images are loaded lazily through ``Sample.load_image``; decode failures are counted by the loader.
"""
from importlib import import_module

for _name in ("shapes", "emoji", "csv_source", "jsonl", "coco", "webdataset_source"):
    import_module(f"{__name__}.{_name}")
