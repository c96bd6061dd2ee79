"""data.sampler=grouped: batches from few groups, never two views of one item, exact resume; composes
with any recipe through config alone."""
import pytest
import torch

from finealign.config import ConfigError, load_config
from finealign.data.loader import TrainLoader, build_source
from finealign.data.skips import SkipLog
from finealign.data.tokenizer import Tokenizer
from finealign.train.loop import Trainer


def _loader(sampler, group_by="category"):
    cfg = load_config("clip", ["data.source=shapes-items", "data.num_samples=300", "data.batch_size=16",
                               f"data.sampler={sampler}", f"data.group_by={group_by}", "data.augment=false"])
    src = build_source(cfg.data, "train", SkipLog())
    tok = Tokenizer.train([c for s in src for c in s.captions], 300)
    return TrainLoader(src, tok, cfg.data, 32, 32), src


def test_grouped_batches_have_no_item_twice_and_few_groups():
    def stats(sampler):
        loader, src = _loader(sampler)
        category = {s.item_id: s.category for s in src}
        it = iter(loader)
        batches = [next(it).item_ids.tolist() for _ in range(2 * loader.batches_per_epoch)]
        return batches, [len({category[i] for i in b}) for b in batches]
    grouped, g_groups = stats("grouped")
    assert all(len(set(b)) == len(b) for b in grouped)              # no false negatives in any batch
    # hard negatives: a batch is built from groups_per_batch = 16 // 4 = 4 of the 5 shape groups
    # (the epoch's last batch may top up from a fifth)
    assert sum(n > 4 for n in g_groups) <= 2
    rnd, r_groups = stats("random")
    assert sum(r_groups) / len(r_groups) > sum(g_groups) / len(g_groups) + 0.5
    assert any(len(set(b)) < len(b) for b in rnd)                   # random does pair views of one item


def test_grouped_sampler_refuses_a_field_the_data_leaves_empty_or_a_typo():
    """shapes-items fills category but not subcategory: one group (None) would make random batches."""
    with pytest.raises(ConfigError, match="same data.group_by=subcategory"):
        _loader("grouped", "subcategory")
    with pytest.raises(ConfigError, match="did you mean 'category'"):
        _loader("grouped", "categroy")


def test_grouped_loader_resumes_exactly():
    a, _ = _loader("grouped")
    ita = iter(a)
    ref = [next(ita) for _ in range(a.batches_per_epoch + 4)]        # crosses an epoch boundary
    b, _ = _loader("grouped")
    itb = iter(b)
    for _ in range(5):
        next(itb)
    state = b.state_dict()
    c, _ = _loader("grouped")
    c.load_state_dict(state)
    itc = iter(c)
    for want in ref[5:]:
        got = next(itc)
        assert got.keys == want.keys and torch.equal(got.images, want.images)


def test_grouped_sampler_composes_with_sycoca_by_config(tmp_path):
    cfg = load_config("sycoca", ["data.source=shapes-items", "data.num_samples=192", "data.batch_size=16",
                                 "data.sampler=grouped", "train.steps=3", "train.ckpt_every=0",
                                 "train.log_every=1", f"train.run_dir={tmp_path}"])
    t = Trainer(cfg, progress=False)
    t.train()
    assert t.step == 3
