"""Every named recipe in configs/experiment composes with the real Hydra configs, keeps the settings
it promises, and runs one fast_dev_run step (tiny model; offline stand-ins for absent data)."""

import pytest

from ddlab.train import train
from tests.conftest import CONFIG_DIR, SHARED_DATA, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
REQUIRED = {"mnist_ddpm", "mnist_cfg", "butterflies_ddim", "imagenet64_iddpm", "imagenet64_block_ablation"}

TINY = [
    "trainer=cpu",
    "trainer.precision=32-true",
    "debug=default",
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "model.num_blocks=1",
    "scheduler.num_timesteps=50",
    "sampler.step_size=null",
    "sampler.steps=2",
    "sampler.progress=false",
    "data.limit=32",
    "data.val_limit=8",
    "data.batch_size=2",
    "callbacks.progress_bar=null",
    "callbacks.sample_grid.n=2",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.fid.every_n_epochs=0",
    "logger=csv",
]
# data that is not on this machine under its own name: the shared offline stand-ins
STAND_INS = {
    "butterflies": lambda cache: [f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.image_size=32",
                                  "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false"],
    "imagenet64": lambda cache: [f"data.path={SHARED_DATA / 'imagenet64_standin'}", "data.num_classes=200",
                                 f"data.cache_dir={cache}", "data.num_workers=0", "data.persistent_workers=false",
                                 "data.pin_memory=false"],
}
# models with global attention heads of fixed width: 8-channel heads, attention on the lower level only
HEAD_FIX = ["model.head_channels=8"]


def test_the_promised_recipes_exist():
    assert REQUIRED <= set(EXPERIMENTS), f"missing: {REQUIRED - set(EXPERIMENTS)}"


def test_recipes_keep_their_settings(tmp_path):
    c = compose(["experiment=butterflies_ddim"], output_dir=tmp_path)
    assert (c.data.image_size, c.module.optimizer.lr, c.module.lr_scheduler.warmup_steps, c.sampler._target_) == (128, 1e-4, 500, "ddlab.diffusion.samplers.ddim")
    assert c.callbacks.ema is not None and c.data.num_classes == 0 and c.name == "butterflies_ddim"
    c = compose(["experiment=imagenet64_iddpm"], output_dir=tmp_path)
    assert (c.scheduler.schedule, c.scheduler.variance, c.scheduler.loss) == ("cosine", "learned_range", "hybrid")
    assert c.module.timestep_sampler._target_.endswith("LossAwareSampler") and c.model.out_channels == 6  # 2C for learned sigmas
    c = compose(["experiment=mnist_cfg"], output_dir=tmp_path)
    assert c.data.num_classes == 10 and c.module.p_uncond > 0 and c.sampler.guidance_scale > 1
    # the measured winner of experiments/mnist_quality
    assert (c.scheduler.prediction, c.scheduler.min_snr_gamma, c.data.image_size) == ("v", 5.0, 28)
    assert (c.sampler._target_, c.sampler.steps) == ("ddlab.diffusion.samplers.dpmpp_2m", 8)
    # the measured winner of experiments/mnist_frontier: decay to 0 over the time budget, low-noise guidance
    assert (c.module.lr_scheduler.decay, c.module.lr_scheduler.decay_over) == ("cosine", "time")
    assert list(c.sampler.guidance_interval) == [0.3, 2.0] and c.sampler.guidance_scale == 2.5
    c = compose(["experiment=mnist_ddpm"], output_dir=tmp_path)
    assert (c.scheduler.schedule, c.sampler._target_, c.data.num_classes) == ("linear", "ddlab.diffusion.samplers.ddpm", 0)


def test_make_train_runs_the_winning_recipe():
    import shlex
    import subprocess

    from tests.conftest import ROOT

    def train_cmd(*extra):
        out = subprocess.run(["make", "-n", "-o", str(ROOT / ".venv" / ".ddlab-installed"), "train", *extra], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        return shlex.split([line for line in out.splitlines() if "ddlab.train" in line][-1])

    cmd = train_cmd()
    assert "experiment=mnist_cfg" in cmd and "torch_threads=2" in cmd
    assert not any(a.startswith("experiment=") for a in train_cmd("EXPERIMENT="))  # the plain base config


def test_block_ablation_is_one_multirun_over_the_zoo():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        c = hydra_compose(config_name="train", overrides=["experiment=imagenet64_block_ablation"], return_hydra_config=True)
    params = c.hydra.sweeper.params
    models = params["model"].split(",")
    assert sorted(models) == sorted(["unet_res_conv", "unet_res", "unet_res_res", "unet_res_res_atn", "unet_res_large"])
    for m in models:
        assert (CONFIG_DIR / "model" / f"{m}.yaml").is_file(), m
    assert params["sampler"].split(",") == ["ddim", "ddpm"] and params["sampler.step_size"].split(",") == ["1", "10"]
    assert str(c.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e != "butterflies_tutorial"])  # a diffusers model: test_interop_models.py
def test_experiment_runs_one_step(name, tmp_path, tmp_path_factory):
    base = compose([f"experiment={name}"], output_dir=tmp_path)
    data = base.data._target_
    extra = []
    for key, fn in STAND_INS.items():
        if key in str(data).lower():
            extra += fn(tmp_path_factory.getbasetemp() / f"{key}_cache")  # converted once per session
    if base.model.get("head_channels"):
        low = (32 if "imagenet64" in str(data).lower() else 16)
        extra += HEAD_FIX + [f"model.attention_resolutions=[{low}]"]
    tiny = TINY if "num_timesteps" in base.scheduler else [o for o in TINY if not o.startswith("scheduler.")]  # EDM: no steps
    if "step_size" not in base.sampler:  # sigma-space samplers have no step_size
        tiny = [o for o in tiny if not o.startswith("sampler.step_size")]
    cfg = compose([f"experiment={name}"] + tiny + extra, output_dir=tmp_path)
    assert cfg.name == name
    train(cfg)
    grids = sorted((tmp_path / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000001.png"]
    assert (tmp_path / "metrics.json").is_file()
