"""Butterflies: parquet in the Hugging Face image layout, a recursive image folder, the real stand-in,
errors, DDP sharding and the Hydra config."""

import io
import pickle
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ddlab.data import ButterfliesDataModule, resize_center_crop
from tests.conftest import SHARED_DATA, compose

S = 16


def png_bytes(arr: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def hf_image_table(images: list[bytes]) -> pa.Table:
    """The column layout `datasets` writes for an `Image()` feature: struct<bytes: binary, path: string>."""
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], type=struct)})


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8)  # HWC, already at image_size


@pytest.fixture
def parquet_dir(tmp_path, arrays):
    d = tmp_path / "hf" / "data"
    d.mkdir(parents=True)
    pq.write_table(hf_image_table([png_bytes(a) for a in arrays[:4]]), d / "train-00000-of-00002.parquet")
    pq.write_table(hf_image_table([png_bytes(a) for a in arrays[4:]]), d / "train-00001-of-00002.parquet")
    return tmp_path / "hf"


@pytest.fixture
def folder(tmp_path, arrays):
    root = tmp_path / "imgs"
    for i, a in enumerate(arrays):
        sub = root / ("a" if i < 3 else "b/c")  # searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(sub / f"{i:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def expected(arr_hwc: np.ndarray) -> torch.Tensor:
    """Independent reference: HWC uint8 -> CHW float64 in [-1, 1]."""
    return torch.from_numpy(arr_hwc.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)


def test_parquet_values_order_and_labels(parquet_dir, arrays):
    dm = ButterfliesDataModule(path=str(parquet_dir), source="auto", image_size=S, batch_size=2)
    assert dm.resolved_source() == "parquet"
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 6
    for i in range(6):
        x, y = dm.val_set[i]  # val: never flipped, file order
        assert x.dtype == torch.float32 and y == 0
        torch.testing.assert_close(x.double(), expected(arrays[i]), atol=1e-6, rtol=0)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (2, 3, S, S) and yb.tolist() == [0, 0] and xb.min() >= -1 and xb.max() <= 1


def test_folder_recursive_and_hflip_train_only(folder, arrays):
    dm = ButterfliesDataModule(path=str(folder), source="folder", image_size=S, batch_size=3, hflip=True)
    dm.setup("fit")
    assert len(dm.train_set) == 6  # a/*.png and b/c/*.png, not notes.txt
    ref = expected(arrays[4])
    # the training sampler hands each image a seeded coin; coin 1 mirrors it, coin 0 leaves it
    torch.testing.assert_close(dm.train_set[(4, 0)][0].double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(dm.train_set[(4, 1)][0].double(), ref.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(dm.val_set[(4, 1)][0].double(), ref, atol=1e-6, rtol=0)  # val: never flipped
    assert all(torch.allclose(dm.val_set[4][0].double(), ref, atol=1e-6) for _ in range(10))


def test_resize_and_center_crop():
    # 24 wide x 16 high at image_size 16: no resampling, crop columns 4..20 exactly
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    out = resize_center_crop(Image.fromarray(a), 16)
    assert out.shape == (3, 16, 16) and np.array_equal(out.transpose(1, 2, 0), a[:, 4:20])
    # a flat colour stays that colour after a downscale
    flat = np.full((40, 30, 3), (10, 200, 77), np.uint8)
    assert (resize_center_crop(Image.fromarray(flat), 8) == np.array([10, 200, 77])[:, None, None]).all()
    # a 64x32 image with a left half 0 and right half 255: the center crop at 16 px keeps both halves
    half = np.zeros((32, 64, 3), np.uint8)
    half[:, 32:] = 255
    out = resize_center_crop(Image.fromarray(half), 16)
    assert (out[:, :, :7] == 0).all() and (out[:, :, 9:] == 255).all()


def test_limits_decode_only_what_is_used(folder, arrays):
    dm = ButterfliesDataModule(path=str(folder), image_size=S, batch_size=2, limit=2, val_limit=3)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 3 and len(dm.load_images()) == 3


def test_ddp_ranks_see_disjoint_samples(folder):
    from ddlab.data.samplers import EpochSeededRandomSampler

    dm = ButterfliesDataModule(path=str(folder), image_size=S, batch_size=1, hflip=False)
    dm.setup("fit")
    shards = []
    for rank in (0, 1):  # the training sampler under 2-process DDP
        sampler = EpochSeededRandomSampler(len(dm.train_set), seed=7, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        shards.append([dm.train_set[k][0].numpy().tobytes() for k in sampler])
    assert len(shards[0]) == len(shards[1]) == 3
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 6


def test_real_standin(tmp_path):
    root = SHARED_DATA / "butterflies_leeds"
    assert root.is_dir(), f"the offline stand-in is expected in {root}"
    dm = ButterfliesDataModule(path=str(root), image_size=32, batch_size=4, limit=8)
    dm.setup("fit")
    assert len(dm.train_set) == 8
    first = sorted(root.glob("*.png"))[0]
    with Image.open(first) as im:
        assert im.size == (128, 128)
        ref = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC))
    torch.testing.assert_close(dm.val_set[0][0].double(), expected(ref), atol=1e-6, rtol=0)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and xb.std() > 0.1 and (yb == 0).all()


# errors --------------------------------------------------------------------------------------
def test_missing_folder_says_how_to_get_it(tmp_path):
    dm = ButterfliesDataModule(path=str(tmp_path / "nope"), source="folder", image_size=S)
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "nope" in msg and "huggan/smithsonian_butterflies_subset" in msg and "data.path" in msg and "butterflies_leeds" in msg


def test_missing_parquet(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .parquet file"):
        ButterfliesDataModule(path=str(tmp_path), source="parquet", image_size=S).setup("fit")


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found"):
        ButterfliesDataModule(path=str(tmp_path), source="folder", image_size=S).setup("fit")


def test_unreadable_image_names_file(folder):
    bad = folder / "b" / "c" / "004.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(ValueError, match="004.png"):
        ButterfliesDataModule(path=str(folder), image_size=S).setup("fit")


def test_corrupt_parquet_row_and_file(parquet_dir, arrays, tmp_path):
    f = parquet_dir / "data" / "train-00001-of-00002.parquet"
    pq.write_table(hf_image_table([png_bytes(arrays[4]), b"\x89PNG garbage"]), f)
    with pytest.raises(ValueError, match=r"train-00001-of-00002.parquet \(row 1\)"):
        ButterfliesDataModule(path=str(parquet_dir), image_size=S).setup("fit")
    f.write_bytes(f.read_bytes()[:50])  # truncated file
    with pytest.raises(ValueError, match="cannot read parquet file .*train-00001-of-00002.parquet"):
        ButterfliesDataModule(path=str(parquet_dir), image_size=S).setup("fit")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"img": [b"x"]}), other)
    with pytest.raises(ValueError, match="no `image` column"):
        ButterfliesDataModule(path=str(other), image_size=S).setup("fit")


def test_hub_without_datasets_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails; nothing is downloaded
    dm = ButterfliesDataModule(path=str(tmp_path / "absent"), source="auto", image_size=S)
    assert dm.resolved_source() == "hub"
    with pytest.raises(ImportError, match=r"pip install 'ddlab\[hub\]'"):
        dm.prepare_data()


def test_bad_arguments():
    with pytest.raises(ValueError, match="data.source"):
        ButterfliesDataModule(source="web")
    with pytest.raises(ValueError, match="data.num_classes must be 0"):
        ButterfliesDataModule(num_classes=10)


def test_config_composes_and_instantiates_without_reading(tmp_path):
    cfg = compose(["data=butterflies"], output_dir=tmp_path)
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.num_classes) == (64, 3, 0)
    assert cfg.model.num_classes == 0 and cfg.model.image_size == 64
    dm = instantiate(cfg.data)  # the default path need not exist: nothing is read here
    assert isinstance(dm, ButterfliesDataModule) and dm._images is None
    cfg = compose(["data=butterflies", f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.image_size=16", "data.limit=4"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.resolved_source() == "folder" and dm.train_set[0][0].shape == (3, 16, 16)
    pickle.loads(pickle.dumps(dm.train_set))  # picklable for spawned workers


def test_bad_file_is_named_before_training_or_skipped_and_counted(folder, caplog):
    (folder / "a" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dm = ButterfliesDataModule(path=str(folder), source="folder", image_size=S, batch_size=2)
    with pytest.raises(ValueError, match=r"zz_broken.png.*data.on_bad_file=skip"):
        dm.setup("fit")
    dm = ButterfliesDataModule(path=str(folder), source="folder", image_size=S, batch_size=2, on_bad_file="skip")
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.skipped_files) == 1 and dm.skipped_files[0].endswith("zz_broken.png")
    assert sum("zz_broken.png" in r.getMessage() for r in caplog.records) == 1  # one warning per file
