"""MNIST IDX reading on files written in the exact official layout, and on the real files."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from ddlab.data import MNISTDataModule, load_mnist, read_idx
from ddlab.data.mnist import ALL_FILES


def write_idx(path, arr: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 8)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def test_reads_written_idx(tiny_mnist):
    x, y = load_mnist(tiny_mnist, "train")
    assert x.shape == (20, 28, 28) and x.dtype == np.uint8
    assert y.tolist() == [i % 10 for i in range(20)]


def test_datamodule_values_and_padding(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist), image_size=32, batch_size=4, download=False)
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 1, 32, 32) and yb.dtype == torch.int64
    assert xb.min() >= -1 and xb.max() <= 1
    # the 2-pixel border is black (-1) and the interior is the digit scaled to [-1, 1]
    raw, _ = load_mnist(tiny_mnist, "train")
    full = dm.train_set.images
    torch.testing.assert_close(full[:, 0, 2:30, 2:30], torch.from_numpy(raw).float() / 127.5 - 1)
    assert (full[:, :, :2] == -1).all() and (full[:, :, :, -2:] == -1).all()
    assert len(dm.val_set) == 8


def test_truncated_file_names_file(tiny_mnist):
    p = tiny_mnist / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(tiny_mnist, "train")


def test_missing_directory_lists_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path, "train", download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and all(f in msg for f in ALL_FILES) and "DDLAB_DATA_DIR" in msg


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(FileNotFoundError, match="download failed"):
        load_mnist(tmp_path, "train", download=True)


def test_real_official_files(mnist_dir):
    x, y = load_mnist(mnist_dir, "test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert hashlib.md5(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").tobytes()).hexdigest() == hashlib.md5(y.astype(np.uint8).tobytes()).hexdigest()


def test_reads_uncompressed_idx(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 28, 28))
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", imgs, compress=False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]), compress=False)
    x, y = load_mnist(tmp_path, "test")
    assert np.array_equal(x, imgs.astype(np.uint8)) and y.tolist() == [3, 1, 4, 1, 5]


def test_bad_magic_names_the_file(tiny_mnist):
    p = tiny_mnist / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[2] = 0x0D  # float data instead of unsigned bytes
    with gzip.open(p, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is not an unsigned-byte IDX file"):
        load_mnist(tiny_mnist, "train")


def test_resize_mode_scales_the_digit(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist), image_size=32, resize="resize", download=False)
    dm.setup("fit")
    x = dm.train_set.images
    raw, _ = load_mnist(tiny_mnist, "train")
    from PIL import Image

    # an independent reference: PIL's bilinear resize of the uint8 digits
    ref = torch.from_numpy(np.stack([np.asarray(Image.fromarray(r).resize((32, 32), Image.BILINEAR)) for r in raw])).float()[:, None] / 127.5 - 1
    assert x.shape == (20, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    # resized, not padded: the border carries image content, and it matches a bilinear resize
    assert not (x[:, :, :2] == -1).all()
    torch.testing.assert_close(x, ref, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="data.resize must be 'pad' or 'resize'"):
        MNISTDataModule(data_dir=str(tiny_mnist), resize="crop").setup("fit")


def test_ddp_ranks_see_disjoint_samples(tiny_mnist):
    from ddlab.data.samplers import EpochSeededRandomSampler

    dm = MNISTDataModule(data_dir=str(tiny_mnist), batch_size=1, download=False)
    dm.setup("fit")
    shards = []
    for rank in (0, 1):  # the training sampler under 2-process DDP
        sampler = EpochSeededRandomSampler(len(dm.train_set), seed=7, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        shards.append([i for i, _ in sampler])
    assert len(shards[0]) == len(shards[1]) == 10
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 20


def test_seeded_shuffle_depends_only_on_seed_and_epoch(tiny_mnist):
    from ddlab.data.samplers import EpochSeededRandomSampler

    a, b = EpochSeededRandomSampler(20, seed=3), EpochSeededRandomSampler(20, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(i for i, _ in a) == list(range(20))
    b.set_epoch(3)
    assert list(a) != list(b)
