"""Random Inception-v3 weights of the right shapes, so every FID code path runs offline in tests.

Test-only: the numbers such weights give are not comparable with published FIDs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from ddlab.metrics.inception import EXTRACTOR, FEATURE_LAYERS


@contextmanager
def _no_weight_loading():
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        yield fe.FeatureExtractorInceptionV3


def write_random_weights(path: str | os.PathLike, seed: int = 0, calibration_images: Sequence[int] = (8, 64)) -> Path:
    """Write an Inception-v3 state dict of the right shapes with random weights (for offline tests).

    Batch-norm statistics are calibrated on ``calibration_images[0]`` random images of size
    ``calibration_images[1]`` so activations stay of unit scale through the network (default
    initialisation would shrink them towards zero). Such weights make every FID code path run; the
    numbers are not comparable with published FIDs.
    """
    torch.manual_seed(seed)
    with _no_weight_loading() as cls:
        net = cls(EXTRACTOR, list(FEATURE_LAYERS))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the running statistics to its own
    g = torch.Generator().manual_seed(seed)
    n, size = calibration_images
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), p)
    return p
