"""The data-parallel baseline on Ray Train, used as the async trainer's fine-tune phase."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_options

from raylocal.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


def test_async_then_ddp_finetune_on_two_workers(mnist_dir, tmp_path):
    storage = tmp_path / "runs"
    args = tiny_options(
        mnist_dir, storage, run_name="d", schedule="async", parts=2, part_spec="1|2", epochs=2,
        finetune_epochs=2, finetune_workers=2, lr=3e-3, progress=False,
    )  # fmt: skip
    assert main(args) == 0
    s = json.loads((storage / "d" / "summary.json").read_text())
    ft = [h for h in s["history"] if h["phase"] == "finetune"]
    assert len(ft) == 2 and all(h["ddp_images_per_s"] > 0 for h in ft)
    assert s["phase_time"]["finetune"] > 0
    # the DDP fine-tune improved the assembled model
    assert s["curve"][-1]["test_bpd"] < s["curve"][0]["test_bpd"]
    assert s["curve"][-1]["epoch"] == 4
