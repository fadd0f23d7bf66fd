"""The training order: a pure function of (seed, epoch), split across ranks, resumable at any batch
for all three DataModules, with and without worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddlab.data import ButterfliesDataModule, ImageNet64DataModule, MNISTDataModule
from ddlab.data.samplers import EpochSeededRandomSampler, ResumableDataLoader
from tests.unit.test_data_imagenet64 import make_split, write_npz
from tests.unit.test_mnist_data import write_idx


def mnist(tmp_path, **kw):
    tmp_path.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 8)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return MNISTDataModule(data_dir=str(tmp_path), download=False, image_size=28, **kw)


def butterflies(tmp_path, **kw):
    tmp_path.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    return ButterfliesDataModule(path=str(tmp_path), source="folder", image_size=8, hflip=True, **kw)


def imagenet64(tmp_path, **kw):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir(parents=True)
    write_npz(src, {"train": [make_split(rng, 12, 4), make_split(rng, 8, 4)], "val": [make_split(rng, 4, 4)]})
    return ImageNet64DataModule(path=str(src), cache_dir=str(tmp_path / "c"), image_size=8, num_classes=4, hflip=True, **kw)


def epoch_batches(dm, epoch, state=None, stop=None):
    """Batches (as float64 images) of one epoch of a fresh loader, optionally restored from ``state``."""
    dl = dm.train_dataloader()
    assert isinstance(dl, ResumableDataLoader)
    if state is not None:
        dl.load_state_dict(state)
    dl.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    out = []
    for x, y in dl:
        out.append(torch.cat([x.flatten(1).double(), y[:, None].double()], 1))
        if stop is not None and len(out) == stop:
            return out, dl.state_dict()
    return out, dl.state_dict()


# one data set with worker processes is enough (they start slowly)
@pytest.mark.parametrize("make,workers", [(mnist, 0), (butterflies, 0), (imagenet64, 0), (imagenet64, 2)])
def test_loader_resumes_mid_epoch_with_the_same_batches(tmp_path, make, workers):
    dm = make(tmp_path, batch_size=3, num_workers=workers)
    dm.setup("fit")
    full, end = epoch_batches(dm, epoch=2)
    assert len(full) == 20 // 3 and end["epoch"] == 3 and end["batches"] == 0  # a complete epoch points at the next
    head, state = epoch_batches(dm, epoch=2, stop=4)
    assert state["epoch"] == 2 and state["batches"] == 4
    dm2 = make(tmp_path / "fresh", batch_size=3, num_workers=workers)
    dm2.setup("fit")
    tail, _ = epoch_batches(dm2, epoch=2, state=state)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other, _ = epoch_batches(dm, epoch=3)
    assert not all(torch.equal(a, b) for a, b in zip(other, full))  # another epoch, another order


def test_restored_state_of_another_epoch_is_ignored(tmp_path):
    """Lightning may move to the next epoch (e.g. after limit_train_batches) before the first batch:
    the saved position then does not apply."""
    dm = mnist(tmp_path, batch_size=3)
    dm.setup("fit")
    full, _ = epoch_batches(dm, epoch=1)
    tail, _ = epoch_batches(dm, epoch=1, state={"epoch": 0, "batches": 4})
    assert len(tail) == len(full) and all(torch.equal(a, b) for a, b in zip(tail, full))


def test_changed_batch_size_is_refused(tmp_path):
    dm = mnist(tmp_path, batch_size=4)
    dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size=3.*this run has 4"):
        dm.train_dataloader().load_state_dict({"epoch": 0, "batches": 1, "batch_size": 3})
    dm.train_dataloader().load_state_dict({"epoch": 1, "batches": 0, "batch_size": 3})  # an epoch end: allowed


def test_sampler_is_seeded_split_across_ranks_and_flips_half():
    a, b = EpochSeededRandomSampler(21, seed=3), EpochSeededRandomSampler(21, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(i for i, _ in a) == list(range(21))
    # the permutation is torch.randperm under the generator seeded with seed + epoch
    assert [i for i, _ in a] == torch.randperm(21, generator=torch.Generator().manual_seed(5)).tolist()
    ranks = [EpochSeededRandomSampler(21, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    shares = [[i for i, _ in s] for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 11  # padded to split evenly, as DistributedSampler does
    assert set(shares[0]) | set(shares[1]) == set(range(21))
    assert shares[0][:10] == [i for i, _ in a][0:20:2]
    big = EpochSeededRandomSampler(4000, seed=0)
    coins = [c for _, c in big]
    assert 0.45 < sum(coins) / len(coins) < 0.55  # each image flipped with probability 1/2
