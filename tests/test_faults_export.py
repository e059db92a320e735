"""Training outputs: checked before the first step, exported whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest

from tests.test_faults import user_error


# -- training outputs: checked before the first step, exported whole or not at all -----------------
def sft_args(export, *extra):
    return [
        "fit",
        "--config",
        "configs/tiny/sft.yaml",
        f"--export.dirpath={export}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: read-only by mode, or (as root, whom modes do not stop) under /sys."""
    if os.geteuid() == 0:
        return Path("/sys/synpref-test-readonly")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_unwritable_export_folder_fails_before_training(in_tmp, tmp_path, monkeypatch, capsys):
    from synpref.modules import SFTModule

    steps = []
    step = SFTModule.training_step
    monkeypatch.setattr(SFTModule, "training_step", lambda self, *a: steps.append(1) or step(self, *a))
    ro = unwritable_folder(tmp_path)
    start = time.time()
    assert re.search(rf"{ro}: cannot write there", user_error(capsys, sft_args(ro / "sft")))
    assert steps == [] and time.time() - start < 120
    assert not (ro / "sft").exists()


def test_full_disk_during_export_keeps_the_old_model_whole(in_tmp, tiny_model, monkeypatch):
    import transformers.modeling_utils

    from synpref.cli import main

    export = in_tmp / "artifacts" / "tiny" / "sft"
    # As configs/tiny/sft.yaml says to make a run resumable.
    resumable = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    main(sft_args(export, *resumable))  # an earlier, complete export
    before = {f.name: f.read_bytes() for f in export.iterdir()}
    assert "model.safetensors" in before and "config.json" in before

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    with pytest.raises(OSError, match="No space left"):
        main(sft_args(export, *resumable, "--model.init_args.lr=0.1"))
    assert {f.name: f.read_bytes() for f in export.iterdir()} == before  # the old model, whole
    assert sorted(p.name for p in export.parent.iterdir()) == ["base", "sft", "sft_checkpoints"]  # no half copy
    # Checkpoints default beside the export, not in the logger's ./<experiment>/<run>/ folder.
    assert (export.parent / "sft_checkpoints" / "last.ckpt").is_file()
    assert not list(in_tmp.glob("*/*/checkpoints"))
