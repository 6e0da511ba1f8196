"""The end-to-end trainer: learning, checkpoints, resume, stability guard."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_options, untrained_bpd

from raylocal.cli.train import main
from raylocal.core.checkpoint import load_checkpoint, save_checkpoint
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import load_dataset
from raylocal.errors import CheckpointError, DivergedError
from raylocal.model.glow import Glow
from raylocal.model.objectives import local_nll, preprocess
from raylocal.tools import pictures
from raylocal.training.trainer import (
    MAX_SKIPS_IN_A_ROW,
    PartTrainer,
    build_glow,
    evaluate_bpd,
    image_bpds,
    initialize,
)


def _summary(storage, name):
    return json.loads((storage / name / "summary.json").read_text())


def test_e2e_run_learns_and_writes_everything(mnist_dir, tmp_path, capsys):
    storage = tmp_path / "runs"
    rc = main(tiny_options(mnist_dir, storage, run_name="r", epochs=3, lr=3e-3))
    assert rc == 0
    s = _summary(storage, "r")
    start = untrained_bpd(mnist_dir)
    assert s["test_bpd"] < start - 0.5, (s["test_bpd"], start)
    cfg = RaylocalConfig(n_levels=2, depth=2, hidden=8, seed=0)
    data = load_dataset("mnist", mnist_dir)
    glow = build_glow(cfg, data.shape)
    assert s["image_shape"] == [1, 8, 8]
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3]
    run = storage / "r"
    assert (run / "samples.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the checkpoint is a plain weights-only file, with the test BPD reproducible from it
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    glow.load_state_dict(ckpt["model"])
    assert abs(evaluate_bpd(glow, data.test, 32, torch.device("cpu")) - s["test_bpd"]) < 1e-6
    out = capsys.readouterr().out
    assert "test BPD" in out and "1x8x8" in out


def test_trained_model_reconstructs_in_float32(mnist_dir, tmp_path):
    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="r", epochs=2, lr=3e-3)) == 0
    glow = build_glow(RaylocalConfig(n_levels=2, depth=2, hidden=8), (1, 8, 8))
    glow.load_state_dict(load_checkpoint(storage / "r" / "checkpoint.pt")["model"])
    x = preprocess(load_dataset("mnist", mnist_dir).test, 8)
    with torch.no_grad():
        err = (glow.reconstruct(x) - x).abs().max().item()
    assert err < 1e-4
    # the README's pictures of this run: an 4x4 sample grid, and test images over their reconstructions
    from torchvision.io import read_image

    samples, recon = pictures.pictures(storage / "r", tmp_path / "pic" / "r", n=4, temperature=0.7)
    grid = read_image(str(recon))[0]  # 1 px borders: rows of 8 px images start at 1, 10, 19, 28
    assert grid.shape == (37, 37) and read_image(str(samples)).shape[1:] == (37, 37)
    for top in (1, 19):  # each row of test images equals the row of reconstructions below it
        assert torch.equal(grid[top : top + 8], grid[top + 9 : top + 17])
    assert grid[1:9].float().std() > 0  # and they are images, not blanks


def test_the_outliers_tool_takes_the_test_bpd_apart_image_by_image(mnist_dir, tmp_path, capsys):
    from raylocal.tools import outliers

    storage = tmp_path / "runs"
    cap = 7.0  # between the images' BPDs: some are capped, some not (checked below)
    assert main(tiny_options(mnist_dir, storage, run_name="r", epochs=1, lr=3e-3, samples=0, eval_cap=cap)) == 0
    assert f"; each image at most {cap:g} bits/dim)" in capsys.readouterr().out
    found = outliers.outliers(storage / "r", held_out=40, worst=3)
    # each image's BPD again, independently: the run's fixed evaluation noise, batch by batch
    glow = build_glow(RaylocalConfig(n_levels=2, depth=2, hidden=8), (1, 8, 8))
    glow.load_state_dict(load_checkpoint(storage / "r" / "checkpoint.pt")["model"])
    data = load_dataset("mnist", mnist_dir)
    per_image = {}
    for name, images in (("test", data.test), ("held-out", data.train[-40:])):
        noise = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            per = torch.cat([local_nll(glow.whole(), preprocess(images[i : i + 32], 8, noise))[0].double()
                             for i in range(0, len(images), 32)])  # fmt: skip
        s, order = found[name], per.argsort(descending=True)
        per_image[name] = per
        assert s["images"] == len(images) and s["mean"] == pytest.approx(per.mean().item(), abs=1e-9)
        assert s["median"] == pytest.approx(per.median().item(), abs=1e-9)
        assert [i for i, _ in s["worst"]] == order[:3].tolist()
        assert s["mean_without_worst"] == pytest.approx(per[order[3:]].mean().item(), abs=1e-9)
        assert s["capped_mean"] == pytest.approx(per.clamp(max=cap).mean().item(), abs=1e-9)
    # the run's own evaluation capped each image (--eval-cap)
    test = per_image["test"]
    assert (test > cap).any() and (test < cap).any() and found["test"]["capped_mean"] < found["test"]["mean"] - 1e-6
    summary = _summary(storage, "r")
    assert summary["test_bpd"] == pytest.approx(found["test"]["capped_mean"], abs=1e-9) and summary["eval_cap"] == cap
    # --cap scores the same model with another cap than the run's
    recapped = outliers.outliers(storage / "r", held_out=None, worst=3, cap=cap - 1)["test"]["capped_mean"]
    assert recapped == pytest.approx(test.clamp(max=cap - 1).mean().item(), abs=1e-9)
    assert outliers.main([str(storage / "r"), "--cap", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --cap 0: a cap is a BPD above 0"
    assert outliers.main([str(storage / "r"), "--cap", "8", "--explain", "3"]) == 2  # not silently ignored
    assert capsys.readouterr().err.strip() == (
        "error: --cap 8: --explain shows an image's own terms, uncapped; drop one of them"
    )
    assert outliers.main([str(storage / "r"), "--worst", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"test ({len(data.test)} images): BPD ")
    assert outliers.main([str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'none' / 'config.json'} does not exist (a finished run's directory holds it)"
    ]
    # --explain: each image's terms add up to the BPD the evaluation gave it
    assert outliers.main([str(storage / "r"), "--explain", "30", "--explain", "held-out:2", "--held-out", "40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("  costliest element: ") and lines[3].startswith("  costliest")
    for line, want in ((lines[0], float(per_image["test"][30])), (lines[2], float(per_image["held-out"][2]))):
        total, terms = line.split(": ", 1)[1].split(" bits/dim = ")
        values = [float(t.rsplit(" ", 1)[1]) for t in terms.split(", ")]
        assert float(total) == pytest.approx(want, abs=0.006) and sum(values) == pytest.approx(want, abs=0.1)
    for bad, message in [
        ("held-out:2", "--explain held-out:2: give --held-out N to name the held-out images"),
        ("abc", "--explain 'abc': expected an image index, or test:INDEX or held-out:INDEX"),
        ("9999", "--explain: image 9999 does not exist"),
    ]:
        assert outliers.main([str(storage / "r"), "--explain", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def _planted_glow() -> Glow:
    torch.manual_seed(0)
    glow = build_glow(RaylocalConfig(n_levels=2, depth=2, hidden=8), (1, 8, 8))
    initialize([glow.whole()], preprocess(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), 8))
    return glow.eval()


def test_explain_splits_an_images_bpd_into_terms_and_finds_the_element_that_costs_most():
    from raylocal.tools.outliers import evaluated_image, explain, ink_share

    glow = _planted_glow()
    one = torch.Generator().manual_seed(1)
    x = preprocess(torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8, generator=one), 8)
    plain = float(local_nll(glow.whole(), x)[0])
    # Fresh couplings and split priors are zero convolutions: every latent cell depends on its own patch
    # alone, so a pixel planted far out costs in the one cell over it
    planted = x.clone()
    planted[0, 0, 5, 2] = 40.0
    terms, e = explain(glow, planted)
    total = float(local_nll(glow.whole(), planted)[0])
    assert sum(terms.values()) == pytest.approx(total, rel=1e-5) and total - plain > 100
    assert e.rows[0] <= 5 < e.rows[1] and e.cols[0] <= 2 < e.cols[1] and "prior" in e.term
    assert e.bits > 0.5 * (total - plain) and e.mean is not None and e.std is not None
    # with every weight perturbed, the terms still add up
    with torch.no_grad():
        for p in glow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms, e = explain(glow, x)
    assert sum(terms.values()) == pytest.approx(float(local_nll(glow.whole(), x)[0]), rel=1e-5)
    # any term's element: the lowest log-density, where it sits, and its share in bits/dim of the image
    from raylocal.tools.outliers import _costliest

    log_density = torch.zeros(4, 2, 3)
    log_density[2, 1, 2] = -50.0
    value = torch.arange(24.0).reshape(1, 4, 2, 3)
    e = _costliest("block 2 coupling", log_density, 2, -0.5, {"value": value})
    assert (e.channel, e.row, e.col, e.rows, e.cols) == (2, 1, 2, (4, 8), (8, 12)) and e.bits == 25.0
    assert e.value == 2 * 6 + 1 * 3 + 2 and e.mean is None and e.std is None
    # the image as the evaluation scored it: its own batch's noise
    images = torch.randint(0, 256, (70, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = image_bpds(glow, images, 32, torch.device("cpu"))
        for k in (0, 33, 69):
            assert float(local_nll(glow.whole(), evaluated_image(images, k, 32, 8))[0]) == pytest.approx(float(want[k]))
    # ink: any non-zero pixel of the patch, image by image
    train = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    train[0, 0, 1, 1], train[1, 0, 0, 3], train[2, 0, 6, 6] = 9, 1, 255
    assert ink_share(train, (0, 2), (0, 2)) == 0.25 and ink_share(train, (0, 4), (0, 4)) == 0.5


def _weights(path):
    return load_checkpoint(path)["model"]


def test_interrupted_and_resumed_run_matches_uninterrupted(mnist_dir, tmp_path):
    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="full", epochs=3)) == 0
    # "interrupted": stops after one epoch, then resumes for the rest
    assert main(tiny_options(mnist_dir, storage, run_name="cut", epochs=1)) == 0
    assert main(tiny_options(mnist_dir, storage, run_name="cut", epochs=3, resume=True)) == 0
    a, b = _weights(storage / "full/checkpoint.pt"), _weights(storage / "cut/checkpoint.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mid_epoch_checkpoint_resume_is_exact(mnist_dir, tmp_path):
    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="full", epochs=2)) == 0
    # stop in the middle of epoch 1 through the time budget after a step checkpoint
    opts = tiny_options(mnist_dir, storage, run_name="cut", epochs=2, checkpoint_every=1, time_budget=1e-9)
    assert main(opts) == 0
    assert load_checkpoint(storage / "cut/checkpoint.pt")["stream"]["position"] == 1
    assert main(tiny_options(mnist_dir, storage, run_name="cut", epochs=2, resume=True, time_budget=1e9)) == 0
    a, b = _weights(storage / "full/checkpoint.pt"), _weights(storage / "cut/checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_model(mnist_dir, tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="r")) == 0
    assert main(tiny_options(mnist_dir, storage, run_name="r", resume=True, hidden=16)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --hidden 16 differs from the checkpoint's 8")


def test_checkpoint_corruption_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0), "n": 3})
    assert load_checkpoint(path)["n"] == 3
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match="c.pt: not a readable checkpoint"):
        load_checkpoint(path)
    # flip bytes inside the tensor data: the archive still parses, the checksum does not match
    idx = bytes(raw).find(torch.arange(1000.0)[500:502].numpy().tobytes())
    raw[idx : idx + 4] = b"\x00\x00\x80\x7f"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_checkpoints_name_their_kind_and_format_and_a_foreign_one_is_one_line(mnist_dir, tmp_path, capsys):

    storage = tmp_path / "runs"
    assert main(tiny_options(mnist_dir, storage, run_name="r")) == 0
    run_ckpt = storage / "r" / "checkpoint.pt"
    payload = load_checkpoint(run_ckpt, kind="run")
    assert (payload["kind"], payload["format"]) == ("run", 2)
    with pytest.raises(CheckpointError, match="checkpoint.pt: a run checkpoint, not a part checkpoint$"):
        load_checkpoint(run_ckpt, kind="part")
    # written before checkpoints carried a kind: a run's (format 1, this layout) is read, an old part's is not
    legacy = {k: v for k, v in payload.items() if k not in ("kind", "sha256")} | {"format": 1}
    save_checkpoint(tmp_path / "legacy.pt", legacy)
    assert load_checkpoint(tmp_path / "legacy.pt", kind="run")["model"].keys() == payload["model"].keys()
    save_checkpoint(tmp_path / "part.pt", {"index": 0, "format": 1})
    with pytest.raises(
        CheckpointError, match=r"a part checkpoint from an older raylocal \(format 1; this version reads 2\)"
    ):
        load_checkpoint(tmp_path / "part.pt", kind="part")
    save_checkpoint(tmp_path / "new.pt", {"kind": "run", "format": 3})
    with pytest.raises(CheckpointError, match=r"from a newer raylocal \(format 3; .*upgrade raylocal"):
        load_checkpoint(tmp_path / "new.pt", kind="run")
    # resuming from a checkpoint of another kind: one line, no traceback
    save_checkpoint(run_ckpt, {"index": 0}, kind="part")
    capsys.readouterr()  # the first run's progress
    assert main(tiny_options(mnist_dir, storage, run_name="r", resume=True, epochs=2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_ckpt}: a part checkpoint, not a run checkpoint"]


def _trainer(index: int = 0, fed_images: bool = False, **cfg):
    torch.manual_seed(0)
    glow = Glow((1, 8, 8), n_levels=2, depth=1, hidden=8)
    config = RaylocalConfig(**({"warmup_steps": 0, "snapshot_every": 1} | cfg))
    part = glow.whole()
    x = torch.rand(16, 1, 8, 8) - 0.5
    initialize([part], x)
    return PartTrainer(part, 1e-3, config, index, fed_images=fed_images), x


def _poison_and_step(trainer, x):
    """One step on weights made non-finite (injected into a weight): a rollback, by hand."""
    with torch.no_grad():
        trainer.part.layers["2"].log_s.fill_(float("nan"))
    res = trainer.step(x)
    assert res.event.startswith("non-finite loss")
    return res


def test_nonfinite_weights_are_rolled_back():
    trainer, x = _trainer()
    for _ in range(2):
        assert trainer.step(x).event is None
    # snapshots are taken before an update, of weights that a batch has validated
    good = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    assert trainer.step(x).event is None
    res = _poison_and_step(trainer, x)
    assert trainer.rollbacks == 1 and trainer.lr == pytest.approx(5e-4) and trainer.base_lr == 1e-3
    assert torch.isfinite(res.output).all()  # recomputed with the restored weights
    assert all(torch.equal(v, good[k]) for k, v in trainer.part.state_dict().items())
    assert trainer.step(x).event is None  # and training continues


def test_loss_jump_from_own_update_rolls_back_and_backs_off():
    trainer, x = _trainer(rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x + 0.001 * torch.randn_like(x))
    good = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    trainer.step(x)  # its pre-update weights are snapshotted (snapshot_every=1)
    with torch.no_grad():  # a bad (finite) update: the weights themselves got worse
        trainer.part.prior.mean.add_(5.0)  # a finite but much worse prior
    res = trainer.step(x + 0.001 * torch.randn_like(x))
    assert res.event is not None and res.event.startswith("loss jumped")
    assert trainer.events[-1].new_lr == pytest.approx(5e-4)
    restored = trainer.part.state_dict()
    # back to the snapshot taken before the last update (validated by that step's batch)
    assert all(torch.equal(restored[k], good[k]) for k in good)
    assert torch.isfinite(res.output).all()


def test_a_restored_state_that_fails_again_gives_way_to_the_one_before():
    trainer, x = _trainer()  # snapshot_every=1: every step snapshots its pre-update weights
    trainer.step(x)
    older = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    trainer.step(x)  # snapshots now: before this step (older), then ...
    trainer.step(x)  # ... before this one (the newest)
    # the newest snapshot is bad on every batch from now on (as one that a
    # batch validated can be on others)
    trainer._snapshots[-1]["part"]["layers.2.log_s"].fill_(float("nan"))
    _poison_and_step(trainer, x)  # restores the newest snapshot ...
    res = trainer.step(x)  # ... which fails again before a new snapshot replaces it
    assert res.event.startswith("non-finite loss; the state restored last time failed again")
    assert all(torch.equal(v, older[k]) for k, v in trainer.part.state_dict().items())
    assert torch.isfinite(res.output).all()
    for _ in range(3):
        assert trainer.step(x).event is None
    assert trainer.rollbacks == 2


def test_input_drift_is_not_blamed_on_a_part_fed_by_another():
    # the loss jumps because the input moved (as when upstream parts change),
    # while the weights do as well as before on the previous batch: no rollback,
    # and the part learns from the batch
    trainer, x = _trainer(index=1, rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x + 0.001 * torch.randn_like(x))
    before = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    res = trainer.step(x * 50)
    assert res.event is None and not res.skipped and trainer.rollbacks == 0 and trainer.skipped == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.part.state_dict().items())


@pytest.mark.parametrize("index,fed_images", [(0, False), (2, True)])  # part 1; the fine-tune
def test_an_outlier_batch_of_the_data_itself_is_skipped(index, fed_images):
    # the same jump where the input is the data, which never moves: weights fine
    # on the previous batch meet a batch they fit far worse. Learning from it
    # took a fine-tune to 168 test BPD; it is skipped, the weights kept
    trainer, x = _trainer(index=index, fed_images=fed_images, rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x + 0.001 * torch.randn_like(x))
    before = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    guard, steps = trainer.guard.state_dict(), trainer.steps
    res = trainer.step(x * 50)
    assert res.skipped and res.event is None and trainer.rollbacks == 0 and trainer.skipped == 1
    assert trainer.steps == steps + 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.part.state_dict().items())
    assert trainer.guard.state_dict() == guard  # its statistics are the data's, not the outlier's
    with torch.no_grad():
        assert torch.equal(res.output, trainer.part(x * 50)[0])  # the output of the kept weights
    assert trainer.step(x).event is None and trainer.skipped == 1  # and training goes on
    assert trainer.state_dict()["skipped"] == 1


@pytest.mark.parametrize("index,fed_images", [(0, False), (2, True)])
def test_a_batch_as_bad_as_the_previous_one_is_learnt_from_not_skipped(index, fed_images):
    # part 1 of a study run froze for 1,364 steps: an update raised its own batch's
    # loss by less than the threshold, every later batch then looked like an
    # outlier and was skipped, the weights kept. The previous batch fits those
    # weights as badly as this one: not an outlier; learnt from, as before the skip
    trainer, x = _trainer(index=index, fed_images=fed_images, rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x + 0.001 * torch.randn_like(x))
    with torch.no_grad():
        trainer.part.layers["2"].log_s.add_(0.5)  # worse on every batch, and finite
        damaged = trainer.part.layers["2"].log_s.clone()
        before = float(local_nll(trainer.part, x)[0].mean())
    trainer._last = (x, before - 0.01)  # as if the last update had raised its own batch's loss by 0.01 only
    threshold = trainer.guard.mean + 5 * max(trainer.guard.dev, 0.01)
    res = trainer.step(x + 0.001 * torch.randn_like(x))
    assert res.loss > threshold  # the guard flagged it ...
    assert res.event is None and not res.skipped and trainer.rollbacks == 0 and trainer.skipped == 0
    assert trainer.guard.count == 1  # ... and relearns its statistics from it
    assert not torch.equal(trainer.part.layers["2"].log_s, damaged)  # it learnt


def test_outliers_come_alone_a_run_of_them_is_learnt_from():
    trainer, x = _trainer(rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x + 0.001 * torch.randn_like(x))
    results = [trainer.step(x * 50) for _ in range(MAX_SKIPS_IN_A_ROW + 1)]
    assert [r.skipped for r in results] == [True] * MAX_SKIPS_IN_A_ROW + [False]
    assert results[-1].event is None and trainer.rollbacks == 0 and trainer.guard.count == 1


def test_validate_catches_a_bad_last_update():
    trainer, x = _trainer(rollback_factor=5.0)
    for _ in range(25):
        trainer.step(x)
    with torch.no_grad():
        trainer.part.layers["3"].net.out.weight.fill_(float("nan"))
    assert trainer.validate().startswith("last update raised its own batch's loss")
    assert trainer.rollbacks == 1
    assert trainer.validate() is None  # nothing left to check after the rollback


def test_backed_off_lr_is_warmed_back_to_its_schedule():
    trainer, x = _trainer(lr_recovery_steps=10)  # warmup 0, constant LR 1e-3, back-off 0.5
    for _ in range(3):
        trainer.step(x)
    _poison_and_step(trainer, x)
    lrs = []
    for _ in range(12):
        lrs.append(trainer.lr)
        assert trainer.step(x).event is None
    # by hand: 0.5 + 0.5 * (steps since the rollback) / 10, then the schedule again
    assert lrs == pytest.approx([1e-3 * (0.5 + 0.05 * i) for i in range(11)] + [1e-3])
    for _ in range(2):
        trainer.step(x)
    # a rollback half way up backs off from where the LR stands; the next recovery takes twice as long
    _poison_and_step(trainer, x)
    assert trainer.lr == pytest.approx(5e-4)
    for _ in range(5):
        trainer.step(x)
    assert trainer.lr == pytest.approx(1e-3 * (0.5 + 0.5 * 5 / 20))  # second recovery: 20 steps
    _poison_and_step(trainer, x)
    assert trainer.lr == pytest.approx(1e-3 * 0.625 * 0.5)
    assert trainer.events[-1].new_lr == pytest.approx(3.125e-4)
    for _ in range(20):
        trainer.step(x)
    assert trainer.lr == pytest.approx(1e-3 * (0.3125 + 0.6875 * 20 / 40))  # third: 40 steps
    # the trainer's checkpoint carries the recovery: a resumed trainer continues it
    state = trainer.state_dict()
    twin, _ = _trainer(lr_recovery_steps=10)
    twin.load_state_dict(state)
    assert twin.lr == trainer.lr and twin.backoff == trainer.backoff and twin.rollbacks == 3


def test_recovery_zero_keeps_the_back_off_for_good():
    trainer, x = _trainer(lr_recovery_steps=0)
    trainer.step(x)
    _poison_and_step(trainer, x)
    _poison_and_step(trainer, x)
    for _ in range(30):
        trainer.step(x)
    assert trainer.lr == pytest.approx(2.5e-4)


def test_repeated_divergence_gives_up_with_clear_error():
    trainer, x = _trainer(max_rollbacks=2)
    with torch.no_grad():
        for p in trainer.part.parameters():
            p.fill_(float("nan"))
    trainer._take_snapshot()  # even the snapshot is broken: nothing can repair it
    with pytest.raises(DivergedError, match="part 1 diverged: 3 rollbacks"):
        for _ in range(3):
            trainer.step(x)


def test_scheduled_lr_warms_up_then_follows_half_a_cosine_to_zero():
    from raylocal.training.trainer import scheduled_lr

    # warmup 10 steps, 110 in all: the cosine covers the 100 steps after warmup
    assert scheduled_lr(1e-3, 4, 10, 110, "cosine") == pytest.approx(5e-4)  # (4+1)/10 of the way up
    assert scheduled_lr(1e-3, 10, 10, 110, "cosine") == pytest.approx(1e-3)
    assert scheduled_lr(1e-3, 60, 10, 110, "cosine") == pytest.approx(5e-4)  # half way: cos(pi/2) = 0
    assert scheduled_lr(1e-3, 35, 10, 110, "cosine") == pytest.approx(1e-3 * (1 + 2**-0.5) / 2)
    assert scheduled_lr(1e-3, 110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert scheduled_lr(1e-3, 500, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert scheduled_lr(1e-3, 60, 10, 110, "constant") == 1e-3
    assert scheduled_lr(1e-3, 60, 10, 0, "cosine") == 1e-3  # total unknown: constant
    # cosine-run: warmup on the trainer's own steps, decay at the run's position
    assert scheduled_lr(1e-3, 0, 10, 110, "cosine-run", position=60) == pytest.approx(1e-4 * 0.5)
    assert scheduled_lr(1e-3, 20, 10, 110, "cosine-run", position=60) == pytest.approx(5e-4)


def test_compiled_training_step_matches_eager():
    """In float64, with every weight moved off its init (a zero-initialised conv
    has ~0 gradients whose sign Adam's first step would amplify into noise)."""
    from torch._dynamo.utils import counters

    def trainer(**cfg):
        torch.manual_seed(0)
        glow = Glow((1, 8, 8), n_levels=2, depth=1, hidden=8).double()
        x = torch.rand(16, 1, 8, 8, dtype=torch.float64) - 0.5
        initialize([glow.whole()], x)
        with torch.no_grad():
            for p in glow.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return PartTrainer(glow.whole(), 1e-3, RaylocalConfig(warmup_steps=0, **cfg)), x

    (eager, x), (compiled, _) = trainer(), trainer(compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(4):
        a, b = eager.step(x), compiled.step(x)
        assert a.event is None and b.event is None
        assert b.loss == pytest.approx(a.loss, rel=1e-12)
        torch.testing.assert_close(b.output, a.output, rtol=1e-9, atol=1e-12)
    assert counters["stats"]["unique_graphs"] > graphs  # it really ran a compiled graph
    for (name, p), q in zip(eager.part.named_parameters(), compiled.part.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=name)


def test_a_rollback_restores_the_optimizer_with_the_weights():
    """Adam's moments belong to the weights they were computed for: a rollback that
    restored the weights but kept the moments of the failed updates would push the
    restored weights the same bad way again."""
    trainer, x = _trainer(snapshot_every=1000)  # only the snapshot before the first update
    initial = {k: v.clone() for k, v in trainer.part.state_dict().items()}
    for _ in range(3):
        assert trainer.step(x).event is None
    assert trainer.optimizer.state_dict()["state"]  # Adam has moments now
    assert trainer.guard.count == 3
    _poison_and_step(trainer, x)
    assert trainer.optimizer.state_dict()["state"] == {}  # as before the first update
    assert trainer.guard.count == 0  # and so are the loss statistics of the guard
    assert all(torch.equal(v, initial[k]) for k, v in trainer.part.state_dict().items())


def test_gradients_are_clipped_to_grad_clip():
    """The update is computed from gradients whose total norm is at most --grad-clip;
    the step reports the norm before clipping."""
    trainer, x = _trainer(grad_clip=1e-3)
    result = trainer.step(x)
    grads = [p.grad for p in trainer.part.parameters() if p.grad is not None]
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert result.grad_norm > 1e-3 * 10  # (this batch's gradient is far above the bound)
    assert clipped == pytest.approx(1e-3, rel=1e-4)
    unclipped, _ = _trainer(grad_clip=0.0)
    unclipped.step(x)
    norms = [torch.linalg.vector_norm(p.grad) for p in unclipped.part.parameters() if p.grad is not None]
    assert float(torch.linalg.vector_norm(torch.stack(norms))) == pytest.approx(result.grad_norm, rel=1e-4)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(mnist_dir, tmp_path, monkeypatch, capsys):
    from raylocal.training import schedules

    real_epoch = schedules.SingleProcessRun._epoch

    def diverge_in(epoch_to_fail: int):
        def epoch(self, epoch: int):
            if epoch == epoch_to_fail:
                raise DivergedError("part 1 diverged: planted")
            return real_epoch(self, epoch)

        return epoch

    storage = tmp_path / "runs"
    monkeypatch.setattr(schedules.SingleProcessRun, "_epoch", diverge_in(0))
    assert main(tiny_options(mnist_dir, storage, run_name="first")) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: part 1 diverged: planted"]
    assert not (storage / "first").exists()
    # after an epoch's checkpoint the run can be resumed: its directory stays, without a summary
    monkeypatch.setattr(schedules.SingleProcessRun, "_epoch", diverge_in(1))
    assert main(tiny_options(mnist_dir, storage, run_name="second", epochs=2)) == 2
    assert (storage / "second" / "checkpoint.pt").is_file() and (storage / "second" / "config.json").is_file()
    assert not (storage / "second" / "summary.json").exists()
