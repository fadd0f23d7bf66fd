"""ImageNet-64: pickled batches, .npz batches and class folders written in the real layouts, the
memory-mapped cache, the real stand-in, errors, DDP sharding and the Hydra config."""

import pickle

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import ddlab.data.prepare as in64  # the one-off conversion lives in ddlab.data.prepare
from ddlab.data import ImageNet64DataModule, open_split, prepare_imagenet64
from ddlab.data.prepare import main as prepare_main
from tests.conftest import SHARED_DATA, compose

R = 8  # 3 * 8 * 8 = 192 bytes per row


def planar_rows(imgs_hwc: np.ndarray) -> np.ndarray:
    """The downsampled-ImageNet row layout, built plane by plane: R plane, G plane, B plane, each row-major."""
    return np.stack([np.concatenate([im[:, :, 0].ravel(), im[:, :, 1].ravel(), im[:, :, 2].ravel()]) for im in imgs_hwc])


def make_split(rng, n, classes):
    imgs = rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8)
    labels = rng.integers(1, classes + 1, n)  # 1-based
    labels[0] = classes  # the highest class is present
    return imgs, labels


@pytest.fixture
def raw():
    rng = np.random.default_rng(0)
    return {"train": [make_split(rng, 5, 4), make_split(rng, 3, 4)], "val": [make_split(rng, 4, 4)]}


def write_pickle(d, raw):
    for k, (imgs, labels) in enumerate(raw["train"], start=1):
        with open(d / f"train_data_batch_{k}", "wb") as f:
            pickle.dump({"data": planar_rows(imgs), "labels": labels.tolist(), "mean": np.zeros(3 * R * R)}, f)
    imgs, labels = raw["val"][0]
    with open(d / "val_data", "wb") as f:
        pickle.dump({"data": planar_rows(imgs), "labels": labels.tolist()}, f)
    return d


def write_npz(d, raw):
    for k, (imgs, labels) in enumerate(raw["train"], start=1):
        np.savez(d / f"train_data_batch_{k}.npz", data=planar_rows(imgs), labels=labels, mean=np.zeros(3 * R * R, np.float32))
    imgs, labels = raw["val"][0]
    np.savez(d / "val_data.npz", data=planar_rows(imgs), labels=labels)
    return d


def chw_float64(img_hwc):
    out = np.empty((3, R, R))
    for c in range(3):
        for h in range(R):
            for w in range(R):
                out[c, h, w] = img_hwc[h, w, c] / 127.5 - 1.0
    return torch.from_numpy(out)


def check_values(dm, raw):
    for split, ds in (("train", dm.train_set), ("val", dm.val_set)):
        imgs = np.concatenate([a for a, _ in raw[split]])
        labels = np.concatenate([b for _, b in raw[split]])
        assert len(ds) == len(imgs)
        for i in range(len(imgs)):
            x, y = ds[i]
            assert y == labels[i] - 1  # 0-based
            if split == "val":
                torch.testing.assert_close(x.double(), chw_float64(imgs[i]), atol=1e-6, rtol=0)
            else:  # maybe flipped
                ref = chw_float64(imgs[i])
                assert torch.allclose(x.double(), ref, atol=1e-6) or torch.allclose(x.double(), ref.flip(-1), atol=1e-6)


@pytest.mark.parametrize("fmt", ["pickle", "npz"])
def test_batches_values_labels_and_memmap(tmp_path, raw, fmt):
    src = tmp_path / "src" / "Imagenet64_train"  # found recursively
    src.mkdir(parents=True)
    (write_pickle if fmt == "pickle" else write_npz)(src, raw)
    dm = ImageNet64DataModule(path=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"), image_size=R, num_classes=4, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.meta["kind"] == fmt and dm.meta["num_classes"] == 4
    assert isinstance(dm.train_set.images, np.memmap) and isinstance(dm.val_set.images, np.memmap)
    assert not dm.train_set.images.flags.writeable
    check_values(dm, raw)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, R, R) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.min() >= -1 and xb.max() <= 1 and yb.min() >= 0 and yb.max() <= 3


def test_cache_is_reused_and_refreshed(tmp_path, raw, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    write_npz(src, raw)
    cache = tmp_path / "cache"
    meta = prepare_imagenet64(src, cache, image_size=R)
    stamp = (cache / "train_images.u8").stat().st_mtime_ns
    calls = []
    real = in64._convert_arrays
    monkeypatch.setattr(in64, "_convert_arrays", lambda *a: calls.append(a) or real(*a))
    dm = ImageNet64DataModule(path=str(src), cache_dir=str(cache), image_size=R, num_classes=4)
    dm.setup("fit")
    assert calls == [] and (cache / "train_images.u8").stat().st_mtime_ns == stamp  # second open: no conversion
    assert dm.meta["fingerprint"] == meta["fingerprint"]
    assert (cache / "train_images.u8").stat().st_size == 8 * 3 * R * R
    assert not list(cache.glob("*.tmp*"))  # temporary files were renamed into place
    # a changed source file is noticed and converted again
    imgs, labels = raw["val"][0]
    np.savez(src / "val_data.npz", data=planar_rows(imgs[:2]), labels=labels[:2])
    prepare_imagenet64(src, cache, image_size=R)
    assert len(calls) == 1
    images, labels0 = open_split(cache, "val")
    assert images.shape == (2, 3, R, R) and labels0.tolist() == (labels[:2] - 1).tolist()


def test_prepare_cli(tmp_path, raw, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_pickle(src, raw)
    prepare_main(["imagenet64", f"src={src}", f"dst={tmp_path / 'mm'}"])
    assert "8" in capsys.readouterr().out
    images, _ = open_split(tmp_path / "mm", "train")
    want = np.concatenate([a for a, _ in raw["train"]])
    assert np.array_equal(np.asarray(images).transpose(0, 2, 3, 1), want)
    with pytest.raises(SystemExit, match="src="):
        prepare_main(["imagenet64", f"dst={tmp_path}"])


def test_class_folders(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "folders"
    want = {"train": [], "val": []}
    for split, n in (("train", 2), ("val", 1)):
        for c in ("n01", "n02", "n03"):
            (src / split / c).mkdir(parents=True)
            for j in range(n):
                a = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
                Image.fromarray(a).save(src / split / c / f"{c}_{j}.png")
                want[split].append((a, int(c[-1]) - 1))
    dm = ImageNet64DataModule(path=str(src), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=3, hflip=False)
    dm.setup("fit")
    assert dm.meta["kind"] == "folder" and dm.meta["classes"] == ["n01", "n02", "n03"]
    for split, ds in (("train", dm.train_set), ("val", dm.val_set)):
        assert len(ds) == len(want[split])
        for i, (a, y) in enumerate(want[split]):
            x, yy = ds[i]
            assert yy == y
            torch.testing.assert_close(x.double(), chw_float64(a), atol=1e-6, rtol=0)


def test_ddp_ranks_see_disjoint_samples(tmp_path, raw):
    from ddlab.data.samplers import EpochSeededRandomSampler

    src = tmp_path / "src"
    src.mkdir()
    write_npz(src, raw)
    dm = ImageNet64DataModule(path=str(src), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=4, hflip=False)
    dm.setup("fit")
    shards = []
    for rank in (0, 1):  # the training sampler under 2-process DDP
        sampler = EpochSeededRandomSampler(len(dm.train_set), seed=0, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        shards.append({dm.train_set[k][0].numpy().tobytes() for k in sampler})
    assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]


def test_memmap_dataset_pickles_by_reference(tmp_path, raw):
    src = tmp_path / "src"
    src.mkdir()
    write_npz(src, raw)
    dm = ImageNet64DataModule(path=str(src), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=4, limit=3, hflip=False)
    dm.setup("fit")
    blob = pickle.dumps(dm.train_set)
    assert len(blob) < 2000  # file name and shape, not the pixels
    ds = pickle.loads(blob)
    assert isinstance(ds.images, np.memmap) and len(ds) == 3
    torch.testing.assert_close(ds[2][0], dm.train_set[2][0])


def test_real_standin(tmp_path):
    root = SHARED_DATA / "imagenet64_standin"
    assert root.is_dir(), f"the offline stand-in is expected in {root}"
    dm = ImageNet64DataModule(path=str(root), cache_dir=str(tmp_path / "c"), num_classes=200, limit=64, val_limit=32, batch_size=16, hflip=False)
    dm.setup("fit")
    assert dm.meta["num_classes"] == 200 and dm.meta["splits"]["train"]["n"] == 5000 and len(dm.meta["classes"]) == 200
    assert len(dm.train_set) == 64 and len(dm.val_set) == 32
    with np.load(root / "val_data.npz") as z:
        row, label = z["data"][5], int(z["labels"][5])
    x, y = dm.val_set[5]
    assert y == label - 1
    hwc = np.stack([row[c * 4096 : (c + 1) * 4096].reshape(64, 64) for c in range(3)], axis=-1)
    torch.testing.assert_close(x.double(), torch.from_numpy(hwc / 127.5 - 1.0).permute(2, 0, 1), atol=1e-6, rtol=0)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 3, 64, 64) and 0 <= yb.min() and yb.max() < 200


# errors --------------------------------------------------------------------------------------
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="image-net.org") as e:
        ImageNet64DataModule(path=str(tmp_path / "none"), cache_dir=str(tmp_path / "c")).setup("fit")
    assert "none" in str(e.value) and "imagenet64_standin" in str(e.value)
    (tmp_path / "only_train").mkdir()
    np.savez(tmp_path / "only_train" / "train_data_batch_1.npz", data=np.zeros((2, 3 * R * R), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(FileNotFoundError, match="no val_data.npz file"):
        ImageNet64DataModule(path=str(tmp_path / "only_train"), cache_dir=str(tmp_path / "c"), image_size=R).setup("fit")


def test_truncated_pickle_names_file(tmp_path, raw):
    write_pickle(tmp_path, raw)
    f = tmp_path / "train_data_batch_2"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="train_data_batch_2.*corrupt or truncated"):
        prepare_imagenet64(tmp_path, tmp_path / "c", image_size=R)
    assert not (tmp_path / "c" / "meta.json").exists()  # no half-valid cache left behind
    assert not [p.name for p in (tmp_path / "c").iterdir() if "tmp" in p.name]  # and no temporary file


def test_wrong_array_shapes_name_file(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 100), np.uint8), labels=np.array([1, 2]))
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3 * R * R), np.uint8), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"train_data_batch_1.npz: rows of 100 bytes"):
        prepare_imagenet64(tmp_path, tmp_path / "c")
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3 * R * R), np.uint8), labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"train_data_batch_1.npz: \(3,\) labels for 2 images"):
        prepare_imagenet64(tmp_path, tmp_path / "c")
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 3 * R * R), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="1-based"):
        prepare_imagenet64(tmp_path, tmp_path / "c")
    np.savez(tmp_path / "train_data_batch_1.npz", images=np.zeros((2, 3 * R * R), np.uint8))
    with pytest.raises(ValueError, match="train_data_batch_1.npz: no data / labels"):
        prepare_imagenet64(tmp_path, tmp_path / "c")


def test_class_count_and_size_mismatch(tmp_path, raw):
    write_npz(tmp_path, raw)
    with pytest.raises(ValueError, match=r"data.num_classes=1000 but .* holds 4 classes: set data.num_classes=4"):
        ImageNet64DataModule(path=str(tmp_path), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=1000).setup("fit")
    with pytest.raises(ValueError, match="data.image_size=64 but .* holds 8x8 images"):
        ImageNet64DataModule(path=str(tmp_path), cache_dir=str(tmp_path / "c"), image_size=64, num_classes=4).setup("fit")
    dm = ImageNet64DataModule(path=str(tmp_path), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=0)
    dm.setup("fit")  # unconditional: labels dropped
    assert {dm.train_set[i][1] for i in range(len(dm.train_set))} == {0}


def test_unreadable_folder_image_names_file(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(tmp_path / split / "n01" / "ok.png")
    (tmp_path / "train" / "n01" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png.*data.on_bad_file=skip"):
        prepare_imagenet64(tmp_path, tmp_path / "c", image_size=R)
    assert not [p.name for p in (tmp_path / "c").iterdir() if "tmp" in p.name]  # no temporary file left
    dm = ImageNet64DataModule(path=str(tmp_path), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=1, on_bad_file="skip")
    dm.setup("fit")
    assert len(dm.train_set) == 1 and dm.skipped_files == ["train/n01/broken.png"]
    with pytest.raises(ValueError, match="data.on_bad_file='ignore': choose from error, skip"):
        ImageNet64DataModule(path=str(tmp_path), on_bad_file="ignore")


def test_config_composes_and_instantiates_without_reading(tmp_path):
    cfg = compose(["data=imagenet64"], output_dir=tmp_path)
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.num_classes) == (64, 3, 1000)
    assert cfg.model.num_classes == 1000
    dm = instantiate(cfg.data)  # the default path need not exist: nothing is read here
    assert isinstance(dm, ImageNet64DataModule) and dm.meta is None
    cfg = compose(["data=imagenet64", f"data.path={SHARED_DATA / 'imagenet64_standin'}", "data.num_classes=200",
                   f"data.cache_dir={tmp_path / 'c'}", "data.limit=8", "data.val_limit=8"])
    assert cfg.model.num_classes == 200
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert len(dm.train_set) == 8 and dm.meta["num_classes"] == 200


def test_worker_processes_read_the_memmap(tmp_path, raw):
    src = tmp_path / "src"
    src.mkdir()
    write_npz(src, raw)
    dm = ImageNet64DataModule(path=str(src), cache_dir=str(tmp_path / "c"), image_size=R, num_classes=4, hflip=False,
                              batch_size=2, num_workers=2, persistent_workers=True, pin_memory=False)
    dm.setup("fit")
    dl = dm.train_dataloader()
    assert dl.num_workers == 2 and dl.persistent_workers
    want = sorted(np.concatenate([b for _, b in raw["train"]]) - 1)
    for _ in range(2):  # two epochs through the same persistent workers
        got = sorted(torch.cat([y for _, y in dl]).tolist())
        assert got == want
