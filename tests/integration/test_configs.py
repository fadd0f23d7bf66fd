"""Every option of every config group composes and instantiates."""


import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import CONFIG_DIR, compose

GROUPS = ["model", "scheduler", "sampler", "data", "trainer", "logger", "callbacks", "debug", "paths", "hparams_search"]


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose([f"{group}={option}"], output_dir=tmp_path)
    node = cfg.get(group) if group not in ("debug", "hparams_search") else None
    if group == "data":
        dm = instantiate(cfg.data)
        assert dm.image_size == cfg.data.image_size
    elif group == "model":
        m = instantiate(cfg.model)
        assert m.image_size == cfg.data.image_size
    elif group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
        # composes; building it needs a GPU, and the error says so
        with pytest.raises(Exception, match="gpu"):
            instantiate(node)
    elif group in ("scheduler", "sampler", "trainer"):
        assert instantiate(node) is not None
    elif group == "paths":
        assert cfg.paths.data_dir and cfg.paths.log_dir and cfg.paths.output_dir == str(tmp_path)
    elif group == "hparams_search":
        assert cfg.optimized_metric
    elif group in ("logger", "callbacks"):
        for v in (node or {}).values():
            if v is not None and "_target_" in v:
                assert instantiate(v) is not None


def test_experiments_compose(tmp_path):
    for option in options("experiment"):
        cfg = compose([f"experiment={option}"], output_dir=tmp_path)
        instantiate(cfg.model)
        instantiate(cfg.scheduler)


def test_unknown_group_option_is_clear():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="unet_rez"):
        compose(["model=unet_rez"])


def test_default_logger_is_csv_and_tensorboard(tmp_path):
    cfg = compose([], output_dir=tmp_path)
    assert sorted(cfg.logger) == ["csv", "tensorboard"]
    kinds = sorted(type(instantiate(v)).__name__ for v in cfg.logger.values())
    assert kinds == ["CSVLogger", "TensorBoardLogger"]


@pytest.mark.parametrize("flag,expect", [("--help", "== Configuration groups =="), ("--cfg job", "optimized_metric:")])
def test_cli_help_and_cfg_job(flag, expect):
    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "ddlab.train", *flag.split()], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
    if flag == "--help":
        for group in ("model", "scheduler", "sampler", "data", "trainer", "logger", "callbacks", "paths", "debug", "experiment"):
            assert f"{group}:" in r.stdout, group
        assert "unet_res_res" in r.stdout
