"""ddlab.io.atomic_write: all or nothing, no temporary file left, disk errors that say what to do."""

import errno
import os

import pytest

from ddlab.io import atomic_write, atomic_write_text


def test_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("new, half written")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("code,match", [
    (errno.ENOSPC, r"disk full writing b.bin in .*: it needs about 3.0 MiB \([0-9.]+ MiB free\)"),
    (errno.EROFS, r"cannot write b.bin in .*: the folder is read-only"),
], ids=["disk_full", "read_only"])
def test_disk_errors_name_the_folder_and_the_space(tmp_path, code, match):
    p = tmp_path / "b.bin"
    p.write_bytes(b"good")
    with pytest.raises(OSError, match=match):
        with atomic_write(p, needed=3 * 2**20) as f:
            f.write(b"x")
            raise OSError(code, os.strerror(code))
    assert p.read_bytes() == b"good" and os.listdir(tmp_path) == ["b.bin"]


def test_wandb_id_falls_back_to_the_fixed_run_id():
    from ddlab.training.wandb_utils import set_resume_id
    from tests.conftest import compose

    cfg = compose(["logger=wandb"])
    assert set_resume_id(cfg.logger, None, fallback_id="train-job42") == "train-job42"
    assert cfg.logger.wandb.id == "train-job42"
    assert set_resume_id(compose(["logger=wandb"]).logger, None) is None  # no checkpoint, no run_id: a new run
