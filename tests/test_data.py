"""Dataset loaders on small files written in each real format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_digits, write_idx_images
from PIL import Image

from raylocal.core.data import BUNDLED_MNIST, BatchStream, load_dataset, read_idx
from raylocal.errors import DataError


def test_idx_round_trip_gz_and_plain(tmp_path):
    images = synthetic_digits(5, size=6)
    write_idx_images(tmp_path / "a.gz", images, gz=True)
    write_idx_images(tmp_path / "b", images, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "b"), images)


def test_idx_wrong_magic_is_one_line_error(tmp_path):
    write_idx_images(tmp_path / "x.gz", synthetic_digits(2), magic=2049)
    with pytest.raises(DataError, match=r"x.gz: not an IDX images file \(magic number 2049, expected 2051\)"):
        read_idx(tmp_path / "x.gz")


def test_idx_truncated(tmp_path):
    path = tmp_path / "t"
    write_idx_images(path, synthetic_digits(3), gz=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="header promises"):
        read_idx(path)


def test_mnist_layouts(tmp_path, mnist_dir):
    data = load_dataset("mnist", mnist_dir)
    assert data.train.shape == (64, 1, 8, 8) and data.test.shape == (32, 1, 8, 8)
    assert data.train.dtype == torch.uint8
    # torchvision's layout: root/MNIST/raw/<name without dot>
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train", "t10k"):
        (raw / f"{name}-images-idx3-ubyte").write_bytes(
            __import__("gzip").decompress((mnist_dir / f"{name}-images-idx3-ubyte.gz").read_bytes())
        )
    tv = load_dataset("mnist", tmp_path / "tv")
    assert torch.equal(tv.train, data.train)


def test_bundled_mnist_is_real_mnist():
    data = load_dataset("mnist", BUNDLED_MNIST)
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    # MNIST's well-known statistics: mean pixel ~33.3 of 255, mostly zeros
    assert 33.0 < data.train.float().mean().item() < 33.6


def test_missing_mnist_dir(tmp_path):
    with pytest.raises(DataError, match="nope: MNIST directory does not exist"):
        load_dataset("mnist", tmp_path / "nope")


def _write_cifar(root: Path, n: int = 4) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        all_data.append(data)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)
    return np.concatenate(all_data[:5])


def test_cifar10_torchvision_format(tmp_path):
    train = _write_cifar(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.train.shape == (20, 3, 32, 32) and data.test.shape == (4, 3, 32, 32)
    assert torch.equal(data.train, torch.from_numpy(train.reshape(-1, 3, 32, 32)))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_dataset("cifar10", tmp_path)


def _write_folder(root: Path, size=(6, 6), n=3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


def test_image_folder_decodes_exactly_and_caches(tmp_path):
    _write_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    data = load_dataset("folder", tmp_path / "imgs", cache_dir=cache)
    assert data.train.shape == (6, 3, 6, 6)
    files = sorted((tmp_path / "imgs" / "train").glob("*/*.png"))
    decoded = [np.asarray(Image.open(f)).transpose(2, 0, 1) for f in files]
    # every image decoded exactly, in the documented fixed shuffle (classes mixed)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    assert all(np.array_equal(data.train[i].numpy(), decoded[j]) for i, j in enumerate(order))
    assert order != sorted(order)
    assert len(list(cache.glob("images-*.pt"))) == 2
    # the cached copy is used on the next load (and gives the same tensor)
    for p in (tmp_path / "imgs").rglob("*.png"):
        p.touch(exist_ok=True)
    again = load_dataset("folder", tmp_path / "imgs", cache_dir=cache)
    assert torch.equal(again.train, data.train)


def test_image_folder_errors(tmp_path):
    root = tmp_path / "f"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"train: no images found"):
        load_dataset("folder", root, cache_dir=tmp_path / "c")
    (root / "train" / "a" / "bad.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match=r"bad.jpg: not a readable image"):
        load_dataset("folder", root, cache_dir=tmp_path / "c")


def test_image_folder_mixed_sizes(tmp_path):
    root = tmp_path / "m"
    _write_folder(root, size=(6, 6), n=1)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "dog" / "9.png")
    with pytest.raises(DataError, match="all images must have the same size"):
        load_dataset("folder", root, cache_dir=tmp_path / "c")


def test_batch_stream_resumes_exactly():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    a = BatchStream(images, 6, seed=3)
    seen = [a.next() for _ in range(15)]  # crosses two epoch boundaries
    assert len(a) == 6
    epoch0 = torch.cat(seen[:6]).flatten()
    assert len(set(epoch0.tolist())) == 36  # no repeats within an epoch
    b = BatchStream(images, 6, seed=3)
    for _ in range(9):
        b.next()
    c = BatchStream(images, 6, seed=3)
    c.restore(b.state())
    assert all(torch.equal(c.next(), s) for s in seen[9:])


def test_validation_holds_out_the_last_training_images(mnist_dir):
    from raylocal.core.config import RaylocalConfig
    from raylocal.run.launch import load_data

    full = load_dataset("mnist", mnist_dir)
    data = load_data(RaylocalConfig(data_root=str(mnist_dir), validation=16, train_subset=40))
    # evaluated on the last 16 training images; trained on the first 40 of the other 48
    assert torch.equal(data.test, full.train[-16:]) and torch.equal(data.train, full.train[:40])
    assert not any(torch.equal(t, v) for t in data.train for v in data.test)
    with pytest.raises(DataError, match="validation=64: the training set has only 64 images"):
        full.held_out(64)


def test_an_actor_sent_node_images_loads_the_drivers_exact_images_and_refuses_other_files(
    mnist_dir, tmp_path, monkeypatch
):
    import ray

    from raylocal.cluster.connect import node_images
    from raylocal.cluster.placement import Placement
    from raylocal.core.config import RaylocalConfig
    from raylocal.core.data import NodeImages, training_images
    from raylocal.run.launch import load_data

    def no_object_store(value):
        raise AssertionError("the images went to the object store")

    def actor_images(config: RaylocalConfig, train: torch.Tensor):  # what a Ray run's plan sends each actor
        return Placement(None, None, node_images(config, train)).train_images(train)

    monkeypatch.setattr(ray, "put", no_object_store)
    monkeypatch.chdir(mnist_dir.parent)
    config = RaylocalConfig(data_root="mnist", validation=8, train_subset=40, images_from="node")
    assert config.data.data_root == str(mnist_dir)  # the driver's directory, made absolute for the actors
    driver = load_data(config)
    sent = actor_images(config, driver.train)  # what crosses the network: a description, not the images
    assert isinstance(sent, NodeImages) and len(pickle.dumps(sent)) < 1000 < driver.train.numel()
    # what the actor's node loads, standing in another directory (as a Ray worker or the async run does)
    monkeypatch.chdir(tmp_path.parent)
    assert torch.equal(training_images(sent), driver.train)
    # a node whose files hold other images is refused in one line, never trained on: here the same
    # count and shape, one pixel changed
    other = driver.train.clone()
    other[3, 0, 2, 2] ^= 1
    with pytest.raises(DataError, match=r"holds other training images than the driver's \(40 of \(1, 8, 8\), digest"):
        NodeImages.of(sent.source, other).load()
    assert training_images(driver.train) is driver.train  # the driver's copy passes through
    with pytest.raises(AssertionError, match="the images went to the object store"):  # the default: they do
        actor_images(RaylocalConfig(data_root="mnist"), driver.train)
