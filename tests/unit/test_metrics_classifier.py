"""The MNIST domain metric: classifier training/saving/reloading, the torch-fidelity extractor, class metrics."""

import math

import numpy as np
import pytest
import torch

from ddlab.metrics import Evaluator
from ddlab.metrics.classifier import (
    ClassifierFeatures,
    MnistCNN,
    class_metrics,
    load_classifier,
    main,
    to_classifier_input,
    train_classifier,
    weights_hash,
)


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory, mnist_dir):
    path = tmp_path_factory.mktemp("cnn") / "mnist_cnn.pt"
    rec = train_classifier(mnist_dir, path, epochs=2, limit=5000, test_limit=1000, batch_size=64, progress=False)
    assert rec["path"] == str(path)
    return path, rec


def _mnist_uint8(mnist_dir, split, n):
    from ddlab.data.mnist import load_mnist

    x, y = load_mnist(mnist_dir, split)
    return np.ascontiguousarray(x[:n, :, :, None]), y[:n]


def test_trains_saves_and_reloads(cnn_path, mnist_dir):
    path, rec = cnn_path
    # a small subset and one epoch already separate the digits well (the full recipe reaches >= 99 %)
    assert rec["accuracy"] > 0.9
    model, stored = load_classifier(path)
    assert stored["accuracy"] == rec["accuracy"] and stored["sha256"] == rec["sha256"] == weights_hash(model.state_dict())
    x, y = _mnist_uint8(mnist_dir, "test", 200)
    feats, logits = model.features_and_logits(to_classifier_input(torch.from_numpy(x).permute(0, 3, 1, 2)))
    assert feats.shape == (200, 128) and logits.shape == (200, 10) and (feats >= 0).all()
    assert (logits.argmax(1).numpy() == y).mean() > 0.9


def test_input_handling_pads_28_and_resizes():
    x28 = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    x28[:, :, 10:18, 10:18] = 255
    x = to_classifier_input(x28.expand(-1, 3, -1, -1))
    assert x.shape == (2, 1, 32, 32)
    assert x[0, 0, :2].eq(-1).all() and x[0, 0, 12:20, 12:20].eq(1).all()  # zero padding as data=mnist does
    assert to_classifier_input(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="1\\|3"):
        to_classifier_input(torch.zeros(1, 2, 32, 32))


def test_missing_and_corrupt_files_are_named(tmp_path, cnn_path):
    with pytest.raises(FileNotFoundError, match="python -m ddlab.metrics.classifier train data=mnist"):
        load_classifier(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="not a readable mnist_cnn classifier"):
        load_classifier(bad)
    blob = torch.load(cnn_path[0], weights_only=True)
    blob["state_dict"]["head.bias"] += 1.0  # edited weights no longer match the stored hash
    edited = tmp_path / "edited.pt"
    torch.save(blob, edited)
    with pytest.raises(RuntimeError, match="sha256"):
        load_classifier(edited)


def test_registered_with_torch_fidelity_and_fid_matches(cnn_path, mnist_dir):
    """torch-fidelity's own calculate_metrics with feature_extractor='mnist_cnn' gives the FID that
    ddlab's Evaluator computes from the same extractor."""
    import torch_fidelity

    path, _ = cnn_path
    feats = ClassifierFeatures(path)  # registers the extractor
    a, _ = _mnist_uint8(mnist_dir, "test", 300)
    b, _ = _mnist_uint8(mnist_dir, "train", 300)

    class DS(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = torch.from_numpy(x).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    tf = torch_fidelity.calculate_metrics(input1=DS(a), input2=DS(b), fid=True, feature_extractor="mnist_cnn",
                                          feature_extractor_weights_path=str(path), cuda=False, verbose=False, cache=False,
                                          batch_size=100)
    from ddlab.metrics import features_to_stats, frechet_distance

    fa, fb = feats.extract(a, progress=False)["fid"], feats.extract(b, progress=False)["fid"]
    ours = frechet_distance(*features_to_stats(fa), *features_to_stats(fb))
    assert tf["frechet_inception_distance"] == pytest.approx(ours, rel=1e-4)


def test_domain_fid_zero_against_itself_and_grows_with_noise(cnn_path, mnist_dir, tmp_path):
    from ddlab.data import MNISTDataModule

    dm = MNISTDataModule(data_dir=str(mnist_dir), val_limit=500)
    ev = Evaluator({"_target_": "ddlab.data.MNISTDataModule", "image_size": 32, "val_limit": 500}, dm, cache_dir=tmp_path,
                   feature_extractor="mnist_cnn", classifier_path=str(cnn_path[0]), progress=False, isc=False)
    x, y = _mnist_uint8(mnist_dir, "test", 500)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    same = ev.evaluate(x, labels=y)
    assert same["fid"] < 1e-6
    assert same["class_accuracy"] > 0.9 and same["class_entropy"] > 0.95 * math.log(10)
    assert "mnist_cnn-" in same["reference"]["key"]
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (0.1, 0.3, 0.6):
        noisy = np.clip(x.astype(np.float64) + rng.normal(0, 255 * sigma, x.shape), 0, 255).astype(np.uint8)
        fids.append(ev.evaluate(noisy, labels=y)["fid"])
    assert 0 < fids[0] < fids[1] < fids[2]


def test_class_metrics_closed_form():
    logits = np.eye(10)[[0, 0, 1, 2, 3, 3, 3, 3]] * 5.0
    out = class_metrics(logits, np.array([0, 1, 1, 2, 3, 3, -1, -1]))
    p = np.array([2, 1, 1, 4]) / 8
    assert out["class_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert out["class_accuracy"] == pytest.approx(5 / 6)  # the two unconditional samples (-1) are not counted
    assert out["class_histogram"][:4] == [2, 1, 1, 4]
    assert class_metrics(np.eye(10), None)["class_entropy"] == pytest.approx(math.log(10))


def test_cli_trains_and_evaluates(tmp_path, mnist_dir, capsys):
    out = tmp_path / "cli.pt"
    rec = main(["train", "data=mnist", f"data_dir={mnist_dir}", f"out={out}", "epochs=1", "limit=500", "test_limit=200"])
    assert out.is_file() and 0 < rec["accuracy"] <= 1
    again = main(["eval", f"path={out}", f"data_dir={mnist_dir}", "test_limit=200"])
    assert again["accuracy_now"] == pytest.approx(rec["accuracy"])
    with pytest.raises(SystemExit, match="only data=mnist"):
        main(["train", "data=butterflies"])
    with pytest.raises(SystemExit, match="unknown option"):
        main(["train", "data=mnist", "epoch=1"])


def test_unknown_extractor_is_named():
    with pytest.raises(ValueError, match="fid.feature_extractor: unknown extractor 'vgg'"):
        Evaluator({}, stats_path="x.npz", feature_extractor="vgg")


def test_model_size():
    assert 0.3e6 < sum(p.numel() for p in MnistCNN().parameters()) < 1.0e6
