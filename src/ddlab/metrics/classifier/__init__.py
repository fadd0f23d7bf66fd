"""A small MNIST classifier as a domain feature extractor (``fid.feature_extractor=mnist_cnn``).

Inception-v3 describes digits poorly and its weights need a download; this CNN trains on the MNIST
train split on a CPU in a few minutes (>= 99 % test accuracy) and gives an offline quality signal:

* a Frechet distance on its 128-d penultimate features ("domain FID") and KID, through the same
  torch-fidelity code path, reference-statistics cache and ``make fid`` as Inception;
* for class-conditional models, its accuracy on guided samples w.r.t. the requested labels, and the
  entropy of the histogram of predicted classes (``log 10 = 2.303`` nats when every digit is drawn
  equally often; lower means mode collapse).

Train and save it with::

    python -m ddlab.metrics.classifier train data=mnist            # -> logs/classifiers/mnist_cnn.pt
    python -m ddlab.metrics.classifier train data=mnist out=cnn.pt epochs=3 limit=10000
    python -m ddlab.metrics.classifier eval path=cnn.pt           # test accuracy of a saved file

The file holds the weights (``state_dict``), the test ``accuracy``, ``sha256`` (hash of the weights,
part of every reference-statistics key) and the training settings. Evaluation finds it through
``fid.classifier_path`` / ``callbacks.fid.classifier_path``, the ``DDLAB_MNIST_CNN`` environment variable,
or the default ``<DDLAB_LOG_DIR or logs>/classifiers/mnist_cnn.pt``.
"""

from .extractor import ClassifierFeatures, class_metrics
from .model import ENV_PATH, FEATURES, INPUT_SIZE, NAME, MnistCNN, default_path, load_classifier, save_classifier, to_classifier_input, weights_hash
from .training import accuracy, main, train_classifier

__all__ = [
    "ENV_PATH", "FEATURES", "INPUT_SIZE", "NAME", "ClassifierFeatures", "MnistCNN", "accuracy", "class_metrics",
    "default_path", "load_classifier", "main", "save_classifier", "to_classifier_input", "train_classifier", "weights_hash",
]
