"""Reference-statistics cache (hit, miss, stale key, corruption), cache keys, weights resolution, inputs."""

import numpy as np
import pytest
import torch

from ddlab.metrics import inception, load_stats, reference_key, reference_stats, to_uint8_nchw3

KEY = "mnist-val-32px-1c-n50-abc123-inception-v3-compat-00000000"


class Counter:
    def __init__(self, seed=0, n=50, d=8):
        self.calls, self.seed, self.n, self.d = 0, seed, n, d

    def __call__(self):
        self.calls += 1
        return np.random.default_rng(self.seed).normal(size=(self.n, self.d))


def test_miss_then_hit_stores_key_and_float64_stats(tmp_path):
    f = Counter()
    st = reference_stats(KEY, tmp_path, f)
    assert st.status == "miss" and f.calls == 1
    path = tmp_path / f"{KEY}.npz"
    assert st.path == path and path.is_file()
    with np.load(path) as z:
        assert str(z["key"]) == KEY and int(z["num_images"]) == 50 and "features" not in z.files
        feats = f()
        np.testing.assert_allclose(z["mu"], feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(z["sigma"], np.cov(feats, rowvar=False), rtol=1e-12)
        assert z["sigma"].dtype == np.float64
    f.calls = 0
    again = reference_stats(KEY, tmp_path, f)
    assert again.status == "hit" and f.calls == 0
    np.testing.assert_array_equal(again.sigma, st.sigma)


def test_features_requested_later_forces_recompute(tmp_path):
    f = Counter()
    reference_stats(KEY, tmp_path, f)
    st = reference_stats(KEY, tmp_path, f, need_features=True)
    assert st.status == "no-features" and f.calls == 2 and st.features.shape == (50, 8)
    st = reference_stats(KEY, tmp_path, f, need_features=True)
    assert st.status == "hit" and f.calls == 2
    np.testing.assert_allclose(st.features, f().astype(np.float32))


def test_stale_key_is_recomputed(tmp_path):
    other = "butterflies-val-64px-3c-n50-abc123-inception-v3-compat-00000000"
    reference_stats(other, tmp_path, Counter(seed=1))
    (tmp_path / f"{other}.npz").rename(tmp_path / f"{KEY}.npz")  # a file under the wrong name
    with pytest.raises(KeyError, match="stale"):
        load_stats(tmp_path / f"{KEY}.npz", expected_key=KEY)
    f = Counter(seed=2)
    st = reference_stats(KEY, tmp_path, f)
    assert st.status == "stale" and f.calls == 1
    assert str(np.load(tmp_path / f"{KEY}.npz")["key"]) == KEY
    np.testing.assert_allclose(st.mu, f().mean(0))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan"])
def test_corrupt_cache_is_recomputed(tmp_path, damage):
    path = tmp_path / f"{KEY}.npz"
    reference_stats(KEY, tmp_path, Counter())
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        np.savez(path, key=np.array(KEY), mu=np.full(8, np.nan), sigma=np.eye(8), num_images=np.array(50))
    with pytest.raises(ValueError, match="corrupt"):
        load_stats(path)
    f = Counter(seed=3)
    st = reference_stats(KEY, tmp_path, f)
    assert st.status == "corrupt" and f.calls == 1
    assert load_stats(path, expected_key=KEY).num_images == 50


def test_reference_key_names_dataset_split_resolution_count_and_variant():
    cfg = {"_target_": "ddlab.data.MNISTDataModule", "image_size": 32, "channels": 1, "num_classes": 10, "resize": "pad",
           "batch_size": 64, "data_dir": "/a"}
    k = reference_key(cfg, "val", 1000, "inception-v3-compat-1234abcd")
    assert k.startswith("mnist-val-32px-1c-n1000-") and k.endswith("-inception-v3-compat-1234abcd")
    # loader settings and paths do not change the images; the resize mode does
    assert reference_key({**cfg, "batch_size": 8, "data_dir": "/b"}, "val", 1000, "inception-v3-compat-1234abcd") == k
    assert reference_key({**cfg, "resize": "resize"}, "val", 1000, "inception-v3-compat-1234abcd") != k
    assert reference_key(cfg, "val", 999, "inception-v3-compat-1234abcd") != k


def test_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="fid.weights_path=/nope"):
        inception.resolve_weights("/nope")
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    assert inception.resolve_weights(str(w)) == w
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(w))
    assert inception.resolve_weights(None) == w
    monkeypatch.delenv(inception.ENV_WEIGHTS)
    monkeypatch.setattr(inception, "_online", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="offline.*DDLAB_INCEPTION_WEIGHTS"):
        inception.resolve_weights(None, key="callbacks.fid.weights_path")
    hub = tmp_path / "hub" / "checkpoints" / inception._url().rsplit("/", 1)[-1]
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"y")  # torch-fidelity's earlier download is found
    assert inception.resolve_weights(None) == hub


def test_images_reach_torch_fidelity_as_uint8_rgb():
    grey = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5, 1)  # NHWC
    x = to_uint8_nchw3(grey)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.uint8
    for c in range(3):
        np.testing.assert_array_equal(x[:, c].numpy(), grey[..., 0])
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)  # NCHW stays
    np.testing.assert_array_equal(to_uint8_nchw3(rgb).numpy(), rgb)
    with pytest.raises(TypeError, match="uint8"):
        to_uint8_nchw3(np.zeros((2, 4, 4, 3), dtype=np.float32))
