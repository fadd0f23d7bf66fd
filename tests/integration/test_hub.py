"""Share trained models: export -> load -> same samples; refusal of missing/altered files; Hub paths
offline (huggingface_hub's HfApi and snapshot_download replaced by a local folder); push at the end of
training; a diffusers UNet exported as a diffusers pipeline that diffusers loads and samples from."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import ddlab
from ddlab.checkpoint import load_checkpoint, read_checkpoint
from ddlab.export import export
from ddlab.train import train
from tests.conftest import compose
from tests.integration.test_train import TINY


class LocalHub:
    """Stands in for the Hub: create_repo + upload_folder copy into ``root/<repo_id>``."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def install(self, mp):
        import huggingface_hub

        hub = self

        def create_repo(self_api, repo_id, repo_type=None, private=False, exist_ok=False, **kw):
            hub.calls.append(("create_repo", repo_id, private, exist_ok))
            (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self_api, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
            hub.calls.append(("upload_folder", repo_id, str(folder_path)))
            shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)

        mp.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        mp.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny conditional MNIST run that pushes itself to the (local) Hub when training ends."""
    root = tmp_path_factory.mktemp("hubrun")
    hub = LocalHub(root / "hub")
    with pytest.MonkeyPatch.context() as mp:
        hub.install(mp)
        train(compose(TINY + ["trainer.max_epochs=1", "scheduler.num_timesteps=20", "push_to_hub=true",
                              "hub_model_id=someone/tiny-mnist", "callbacks.hub.grid_n=4"], output_dir=root / "run"))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"ckpt": ckpt, "root": root, "hub": hub}


@pytest.fixture(scope="module")
def exported(run):
    out = run["root"] / "export"
    export(compose([f"ckpt={run['ckpt']}", f"out={out}", "grid_n=4", "device=cpu"], config_name="export"))
    return out


def test_export_loads_back_with_identical_samples(run, exported):
    p = ddlab.load_pretrained(exported)
    assert not p.model.training and p.ema and p.path == exported
    ref = load_checkpoint(run["ckpt"])  # EMA weights straight from the Lightning checkpoint
    assert p.global_step == ref.global_step > 0
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(p.model.state_dict()[k], v, rtol=0, atol=0)
    sampler = instantiate(ref.config["sampler"])
    sampler.progress = p.sampler.progress = False
    y = torch.tensor([3, 1, 4, 1])
    shape = (4, ref.model.in_channels, ref.model.image_size, ref.model.image_size)
    a = sampler.sample(ref.model, ref.diffusion, shape, y=y, generator=torch.Generator().manual_seed(7), guidance_scale=2.0)
    b = p.sample(4, labels=[3, 1, 4, 1], seed=7, guidance_scale=2.0)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_live_weights_with_ema_false(run, tmp_path):
    out = tmp_path / "live"
    export(compose([f"ckpt={run['ckpt']}", f"out={out}", "ema=false", "grid_n=0"], config_name="export"))
    p = ddlab.load_pretrained(out)
    live = {k[len("model."):]: v for k, v in read_checkpoint(run["ckpt"])["state_dict"].items() if k.startswith("model.")}
    assert not p.ema and not (out / "samples.png").exists()
    for k, v in live.items():
        torch.testing.assert_close(p.model.state_dict()[k], v, rtol=0, atol=0)


def test_config_and_model_card(run, exported):
    cfg = json.loads((exported / "config.json").read_text())
    stored = read_checkpoint(run["ckpt"])["hyper_parameters"]["run_config"]
    for key in ("model", "scheduler", "sampler"):
        assert cfg[key] == stored[key]
    metrics = json.loads((run["ckpt"].parent.parent / "metrics.json").read_text())
    assert cfg["metrics"] == metrics and cfg["ddlab_version"] == ddlab.__version__
    assert "paths" not in cfg["run_config"]  # machine folders are not shared
    card = (exported / "README.md").read_text()
    assert "![samples" in card and (exported / "samples.png").stat().st_size > 0
    assert "ddlab.load_pretrained(" in card and "pipe.sample(16)" in card
    assert "| train/loss |" in card and "## Training config" in card and "base_channels: 8" in card
    manifest = json.loads((exported / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.safetensors", "config.json", "README.md", "samples.png"}


@pytest.mark.parametrize("name,change,error", [
    ("model.safetensors", "delete", "model.safetensors is missing"),
    ("config.json", "edit", "config.json was altered"),
    ("README.md", "edit", "README.md was altered"),
    ("manifest.json", "delete", "no manifest.json"),
])
def test_refuses_missing_or_altered_file(exported, tmp_path, name, change, error):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    if change == "delete":
        (folder / name).unlink()
    else:
        (folder / name).write_text((folder / name).read_text() + " ")
    with pytest.raises((FileNotFoundError, RuntimeError), match=error):
        ddlab.load_pretrained(folder)


def test_hub_id_goes_through_snapshot_download(exported, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_download(repo_id, revision=None, token=None, **kw):
        seen.update(repo_id=repo_id, revision=revision)
        return str(exported)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    p = ddlab.load_pretrained("someone/tiny-mnist", revision="main")
    assert seen == {"repo_id": "someone/tiny-mnist", "revision": "main"} and p.path == exported

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="could not download it from the Hugging Face Hub"):
        ddlab.load_pretrained("someone/other")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ddlab.load_pretrained("./not/here")


def test_export_cli_pushes_to_the_hub(run, tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = tmp_path / "out"
    export(compose([f"ckpt={run['ckpt']}", f"out={out}", "grid_n=0", "push_to_hub=true", "hub_model_id=me/ddlab-tiny",
                    "private=true"], config_name="export"))
    assert hub.calls[0] == ("create_repo", "me/ddlab-tiny", True, True)
    p = ddlab.load_pretrained(tmp_path / "hub" / "me" / "ddlab-tiny")  # what was uploaded loads and verifies
    assert p.global_step == load_checkpoint(run["ckpt"]).global_step
    with pytest.raises(ValueError, match="hub_model_id=user/repo"):
        export(compose([f"ckpt={run['ckpt']}", f"out={out}", "push_to_hub=true"], config_name="export"))


def test_training_pushes_at_the_end(run):
    pushed = run["root"] / "hub" / "someone" / "tiny-mnist"
    assert [c[0] for c in run["hub"].calls] == ["create_repo", "upload_folder"]
    p = ddlab.load_pretrained(pushed)
    ref = load_checkpoint(run["ckpt"])
    assert p.global_step == ref.global_step
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(p.model.state_dict()[k], v, rtol=0, atol=0)
    assert "train/loss" in p.metrics


# ----------------------------------------------------------------------------- diffusers pipelines
def tiny_diffusers_model(num_classes=0):
    """The ddlab wrapper of a tiny UNet2DModel (a stand-in with the same ``.unet`` contract when the
    wrapper is not in this checkout)."""
    from diffusers import UNet2DModel

    kw = dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    torch.manual_seed(0)
    try:
        from ddlab.interop.diffusers_models import DiffusersUNet2D

        return DiffusersUNet2D(image_size=8, in_channels=1, num_classes=num_classes, **kw)
    except ImportError:
        class StandIn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.image_size, self.in_channels, self.out_channels, self.num_classes = 8, 1, 1, num_classes
                self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                        num_class_embeds=num_classes + 1 if num_classes else None, **kw)

            def forward(self, x, t, y=None):
                return self.unet(x, t, class_labels=y).sample

        return StandIn()


@pytest.mark.slow
def test_diffusers_pipeline_export_loads_and_samples_in_diffusers(tmp_path):
    from diffusers import DDIMPipeline, DDPMPipeline

    from ddlab.diffusion import GaussianDiffusion
    from ddlab.interop.pipelines import export_diffusers

    model = tiny_diffusers_model().eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises nothing that matters here, but be sure
            p.add_(0.02 * torch.randn_like(p))
    d = GaussianDiffusion("linear", 50, prediction="eps")  # beta_T = 0.4 (T = 20 would reach beta = 1)
    export_diffusers(model, d, tmp_path / "ddpm", "ddpm")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "ddpm")
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, d.alphas_cumprod.float())
    assert pipe.scheduler.config.prediction_type == "epsilon"
    img = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np").images
    assert img.shape == (2, 8, 8, 1) and np.isfinite(img).all()

    # DDIM pipeline: diffusers' own loop equals ddlab's DDIM sampler (composed config) on the same noise
    sampler_cfg = compose(["sampler=ddim", "sampler.steps=5", "sampler.spacing=trailing"]).sampler
    export_diffusers(model, d, tmp_path / "ddim", "ddim", sampler_config=dict(sampler_cfg))
    pipe = DDIMPipeline.from_pretrained(tmp_path / "ddim")
    img = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, eta=0.0,
               use_clipped_model_output=True, output_type="np").images
    sampler = instantiate(sampler_cfg)
    sampler.progress = False
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(model, d, noise.shape, noise=noise, guidance_scale=1.0)
    np.testing.assert_allclose(img, ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_diffusers_export_refuses_conditional_and_non_diffusers_models(tmp_path):
    from ddlab.diffusion import GaussianDiffusion
    from ddlab.interop.pipelines import export_diffusers
    from ddlab.models import UNet

    d = GaussianDiffusion("linear", 20)
    with pytest.raises(ValueError, match="class-conditional.*format=ddlab"):
        export_diffusers(tiny_diffusers_model(num_classes=3), d, tmp_path / "x")
    with pytest.raises(ValueError, match="not a model=diffusers_unet2d wrapper"):
        export_diffusers(UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=[1]), d, tmp_path / "y")


def test_evaluation_core_loader_has_checkpoint_fields(run, exported):
    from ddlab.checkpoint import LoadedCheckpoint
    from ddlab.hub import load_pretrained_checkpoint

    p = load_pretrained_checkpoint(exported, use_ema=True, device="cpu")
    ref = load_checkpoint(run["ckpt"])
    assert isinstance(p, LoadedCheckpoint) and p.config["model"] == ref.config["model"] and p.global_step == ref.global_step
    with pytest.raises(ValueError, match="holds the EMA weights only"):
        load_pretrained_checkpoint(exported, use_ema=False)


def test_export_refuses_a_folder_with_other_files(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files \\(notes.txt\\)"):
        export(compose([f"ckpt={run['ckpt']}", f"out={tmp_path}", "grid_n=0"], config_name="export"))


def test_sample_cli_from_pretrained_equals_checkpoint(run, exported, tmp_path):
    """``ddlab.sample pretrained=DIR`` draws what ``ddlab.sample ckpt=...`` draws for the same seed (the
    export carries the run's sampler and guidance); naming both or neither is refused."""
    from ddlab.sample import sample

    common = ["n=4", "batch_size=4", "seed=3", "device=cpu", "progress=false"]
    a = sample(compose(common + [f"ckpt={run['ckpt']}", f"out={tmp_path / 'a'}"], config_name="sample"))
    b = sample(compose(common + [f"pretrained={exported}", f"out={tmp_path / 'b'}"], config_name="sample"))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["sampler"] == b["sampler"]
    with pytest.raises(ValueError, match="either ckpt=.* or pretrained="):
        sample(compose(common + [f"ckpt={run['ckpt']}", f"pretrained={exported}"], config_name="sample"))
    with pytest.raises(ValueError, match="no model: give ckpt=.*or pretrained="):
        sample(compose(common, config_name="sample"))
