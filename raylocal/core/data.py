"""Image datasets as uint8 tensors [N, C, H, W], decoded once and cached.

Three sources, all read from local files (``--download`` only fetches CIFAR-10
for users who are online):
- MNIST in its original IDX format, gzipped or not; file names as distributed
  (``train-images-idx3-ubyte``) or as in the bundled copy
  (``train-images.idx3-ubyte``), directly in the root or in torchvision's
  ``MNIST/raw`` layout.
- CIFAR-10 in torchvision's python format (``cifar-10-batches-py``), read with
  a restricted unpickler that only rebuilds numpy arrays: no code from the file runs.
- Any ImageFolder tree ``root/{train,test}/<class>/<image>``; decoded images
  are cached as a uint8 tensor so later runs (and epochs) never re-decode.

Every problem is a ``DataError`` with one line naming the path and what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from raylocal.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]  # raylocal/core/data.py -> the repository
BUNDLED_MNIST = REPO_ROOT / "data" / "mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    """Train and test images of one dataset, uint8 [N, C, H, W]."""

    name: str
    train: Tensor
    test: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    def held_out(self, n: int) -> ImageData:
        """The last ``n`` training images in place of the test set, and only the rest to train on."""
        if n >= len(self.train):
            raise DataError(f"validation={n}: the training set has only {len(self.train)} images")
        return ImageData(self.name, self.train[:-n], self.train[-n:])

    def subset(self, train: int | None, test: int | None) -> ImageData:
        """The first ``train``/``test`` images (deterministic, for quick runs)."""
        return ImageData(
            self.name,
            self.train[:train] if train else self.train,
            self.test[:test] if test else self.test,
        )


@dataclass(frozen=True)
class DataSource:
    """Which images a run trains and evaluates on: the config's data section as
    plain values, loadable anywhere (on the driver, or on an actor's own node)."""

    dataset: str = "mnist"
    root: str | None = None
    download: bool = False
    cache_dir: str | None = None
    validation: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None

    def load(self) -> ImageData:
        data = load_dataset(self.dataset, self.root, self.download, self.cache_dir)
        if self.validation:
            data = data.held_out(self.validation)
        return data.subset(self.train_subset, self.test_subset)


@dataclass(frozen=True)
class NodeImages:
    """Training images that an actor loads from its own node's disk, in place of
    the driver's copy through Ray's object store (``--images-from node``): only
    this small description crosses the network. ``digest`` is the driver's
    images' own, so that a node whose files hold other images is refused, not
    trained on."""

    source: DataSource
    digest: str

    @classmethod
    def of(cls, source: DataSource, train: Tensor) -> NodeImages:
        return cls(source, images_digest(train))

    def load(self) -> Tensor:
        train = self.source.load().train
        if images_digest(train) != self.digest:
            where = self.source.root or f"the bundled {self.source.dataset}"
            raise DataError(
                f"{where} on this node holds other training images than the driver's ({len(train)} of "
                f"{tuple(train.shape[1:])}, digest {images_digest(train)[:12]} against {self.digest[:12]}); "
                "--images-from node needs the same files on every node"
            )
        return train


def images_digest(images: Tensor) -> str:
    """What a set of images is: its shape and every pixel, hashed (0.1 s for MNIST's 47 MB)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def training_images(images: Tensor | NodeImages) -> Tensor:
    """An actor's training images, from whichever form it was sent."""
    return images.load() if isinstance(images, NodeImages) else images


# ---------------------------------------------------------------- MNIST (IDX)

_IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path: Path, kind: str = "images") -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{path}: not an IDX {kind} file (magic number {magic}, expected {_IDX_MAGIC[kind]})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {'x'.join(map(str, dims))} = {expected} bytes "
            f"of data, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_mnist_file(root: Path, split: str) -> Path:
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in names:
            for suffix in ("", ".gz"):
                if (folder / (name + suffix)).is_file():
                    return folder / (name + suffix)
    raise DataError(f"{root}: no MNIST {split} images (expected {names[0]}[.gz] or {names[1]}[.gz])")


def load_mnist(root: Path) -> ImageData:
    if not root.is_dir():
        raise DataError(f"{root}: MNIST directory does not exist")
    arrays = {}
    for split in ("train", "test"):
        path = _find_mnist_file(root, split)
        images = read_idx(path, "images")
        if images.ndim != 3:
            raise DataError(f"{path}: expected N x H x W images, got shape {images.shape}")
        arrays[split] = torch.from_numpy(images.copy()).unsqueeze(1)
    return ImageData("mnist", arrays["train"], arrays["test"])


# ---------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only what CIFAR-10's batches hold (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected N x 3072 bytes per batch, got {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def load_cifar10(root: Path, download: bool = False) -> ImageData:
    folder = root / "cifar-10-batches-py"
    if download and not folder.is_dir():
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"{root}: CIFAR-10 download failed ({e})") from None
    if not folder.is_dir():
        raise DataError(
            f"{folder}: CIFAR-10 not found (expected torchvision's cifar-10-batches-py; pass --download when online)"
        )
    train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = _read_cifar_batch(folder / "test_batch")
    return ImageData("cifar10", torch.from_numpy(np.concatenate(train)), torch.from_numpy(test.copy()))


# ---------------------------------------------------------------- ImageFolder


def _list_images(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: ImageFolder split directory does not exist")
    files = sorted(
        p
        for class_dir in sorted(split_dir.iterdir())
        if class_dir.is_dir()
        for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"{split_dir}: no images found (expected <class>/<image> with one of {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _decode_images(files: list[Path]) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    first_shape = None
    out = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                arr = np.asarray(img.convert("L" if mode in ("L", "1", "I;16", "I") else "RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        if first_shape is None:
            first_shape = arr.shape
            out = np.empty((len(files), *arr.shape), dtype=np.uint8)
        elif arr.shape != first_shape:
            raise DataError(
                f"{path}: image is {arr.shape[2]}x{arr.shape[1]}x{arr.shape[0]} but "
                f"{files[0].name} is {first_shape[2]}x{first_shape[1]}x{first_shape[0]} "
                "(all images must have the same size)"
            )
        out[i] = arr
    return torch.from_numpy(out)


def _cache_key(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYLOCAL_CACHE", Path.home() / ".cache" / "raylocal"))


def _cached_decode(files: list[Path], cache_dir: Path | None) -> Tensor:
    if cache_dir is None:
        return _decode_images(files)
    path = cache_dir / f"images-{_cache_key(files)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a broken cache file is rebuilt, never trusted
            pass
    images = _decode_images(files)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(images, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache is not an error; we just decode next time too
    return images


def load_image_folder(root: Path, cache_dir: Path | None) -> ImageData:
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder directory does not exist")
    splits = {}
    for split in ("train", "test"):
        files = _list_images(root / split)
        # ImageFolder trees are sorted by class; a fixed shuffle makes any prefix
        # (--train-subset) a fair sample of every class, the same on every run.
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        splits[split] = _cached_decode([files[i] for i in order], cache_dir)
    if splits["train"].shape[1:] != splits["test"].shape[1:]:
        raise DataError(
            f"{root}: train images are {tuple(splits['train'].shape[1:])} but test images are "
            f"{tuple(splits['test'].shape[1:])}"
        )
    return ImageData(root.name, splits["train"], splits["test"])


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageData:
    """Load ``mnist`` (default root: the bundled copy), ``cifar10`` or ``folder``."""
    if name == "mnist":
        return load_mnist(Path(root) if root else BUNDLED_MNIST)
    if root is None:
        raise DataError(f"dataset {name!r} needs --data-root")
    if name == "cifar10":
        return load_cifar10(Path(root), download)
    if name == "folder":
        return load_image_folder(Path(root), Path(cache_dir) if cache_dir else default_cache_dir())
    raise DataError(f"unknown dataset {name!r} (expected mnist, cifar10 or folder)")


class BatchStream:
    """Shuffled mini-batches of a uint8 tensor, resumable to the exact batch.

    The permutation of epoch e depends only on (seed, e), so a run restarted at
    any (epoch, position) sees the same batches as one that never stopped.
    """

    def __init__(self, images: Tensor, batch_size: int, seed: int) -> None:
        if len(images) < batch_size:
            raise DataError(f"batch size {batch_size} is larger than the {len(images)} training images")
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch
        self._perm = self._permutation(0)

    def __len__(self) -> int:
        """Batches per epoch (the last, incomplete batch is dropped)."""
        return len(self.images) // self.batch_size

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=g)

    def next(self) -> Tensor:
        """The next batch; rolls over into the next epoch when one ends."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return self.images[idx]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
