"""Datasets as tensors, train/validation/test splits, and resumable batch order.

The embedded default is real data shipped inside an installed wheel (scikit-learn's digits), so a
search runs offline. CIFAR-10 is read from a local folder in its standard python layout, Omniglot from
its zip files. Nothing is ever downloaded: a missing path is a ValueError.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import fraction, integer, optional_integer

DATASETS = ("digits", "cifar10", "omniglot")
OMNIGLOT_SIZE = 32  # CIFAR-10's side, what the NB201 and DARTS networks are built for

Pair = tuple[torch.Tensor, torch.Tensor]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 handwritten digits: images (N, 1, 8, 8) in [0, 1], labels (N,)."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y


def load_cifar10(root: "str | Path") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`).

    `root` is that folder or its parent. Returns (x_train, y_train, x_test, y_test), images in [0, 1].
    """
    root = Path(root)
    folder = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"CIFAR-10 not found at {str(root)!r}: missing {missing} in {str(folder)!r}; expected the "
                         "python version's folder 'cifar-10-batches-py' (nothing is downloaded)")

    def read(name: str) -> Pair:
        batch = read_cifar_batch(folder / name)
        x = torch.from_numpy(batch[b"data"]).reshape(-1, 3, 32, 32).float() / 255.0
        return x, torch.tensor(batch[b"labels"], dtype=torch.long)

    train = [read(n) for n in names[:5]]
    x_test, y_test = read("test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test


# What reading a damaged zip member or image raises: zipfile (bad CRC, truncation), zlib, and Pillow,
# which raises OSError for unreadable or truncated images and SyntaxError for broken PNG chunks.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def omniglot_zips(path: "str | Path") -> list[Path]:
    """The zip files at `path`: the file itself, or every `*.zip` in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".zip":
            raise ValueError(f"Omniglot path {str(path)!r} is not a .zip file; expected a zip or a folder of zips")
        return [path]
    if not path.is_dir():
        raise ValueError(f"Omniglot path {str(path)!r} does not exist; expected a zip file or a folder of zips")
    zips = sorted(path.glob("*.zip"))
    if not zips and (path / "omniglot").is_dir():  # the shared data folder itself
        zips = sorted((path / "omniglot").glob("*.zip"))
    if not zips:
        raise ValueError(f"no .zip files in {str(path)!r}; expected Omniglot's images_background*.zip")
    return zips


def read_omniglot(path: "str | Path", image_size: int) -> dict[tuple[str, str, str], np.ndarray]:
    """Every Omniglot drawing in the zip (or folder of zips) at `path`, keyed (alphabet, character, file),
    resized to `image_size` square, strokes 1 on background 0; a drawing found in several zips (the small
    background sets share 50 characters) is read once."""
    from PIL import Image

    integer("image_size", image_size, minimum=4)
    drawings: dict[tuple[str, str, str], np.ndarray] = {}
    for zip_path in omniglot_zips(path):
        try:
            archive = zipfile.ZipFile(zip_path)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"{str(zip_path)!r} is not a readable zip file ({err})") from None
        with archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png") or tuple(parts[1:]) in drawings:
                    continue  # folders, anything outside <split>/<alphabet>/<character>/<file>.png, repeats
                try:
                    with Image.open(io.BytesIO(archive.read(name))) as im:
                        small = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
                except (*_UNREADABLE, Image.DecompressionBombError) as err:
                    raise ValueError(f"cannot read image {name!r} in {str(zip_path)!r}: {err}") from None
                drawings[tuple(parts[1:])] = 1.0 - np.asarray(small, dtype=np.float32) / 255.0
    if not drawings:
        raise ValueError(f"no Omniglot images under {str(path)!r}; expected <split>/<alphabet>/<character>/*.png")
    return drawings


def load_omniglot_alphabets(path: "str | Path", image_size: int = OMNIGLOT_SIZE) -> Pair:
    """Omniglot as plain classification: which alphabet a handwritten character comes from.

    `path` is a zip or a folder of zips (`<split>/<alphabet>/<character>/*.png`). Returns images
    (N, 1, image_size, image_size), strokes 1 on background 0, and labels, the alphabet's index in sorted
    name order. The two small background sets give 8 alphabets, 4,840 drawings.
    """
    drawings = read_omniglot(path, image_size)
    alphabets = sorted({alphabet for alphabet, _, _ in drawings})
    if len(alphabets) < 2:
        raise ValueError(f"Omniglot at {str(path)!r} holds {len(alphabets)} alphabets; classifying them needs "
                         "at least two (expected <split>/<alphabet>/<character>/*.png in the zips)")
    keys = sorted(drawings)
    x = torch.from_numpy(np.stack([drawings[k] for k in keys])).unsqueeze(1).clamp_(0.0, 1.0)
    return x, torch.tensor([alphabets.index(k[0]) for k in keys])


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: plain containers, bytes, numbers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR-10 python batch, unpickled without running code; ValueError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as err:
        raise ValueError(f"cannot read CIFAR-10 batch {str(path)!r}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 (a damaged pickle raises many types)
        raise ValueError(f"CIFAR-10 batch {str(path)!r} is not a CIFAR-10 python batch: {err}") from None
    images = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2
            or images.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) or len(labels) != len(images)
            or not all(isinstance(v, int) and 0 <= v < 10 for v in labels)):
        raise ValueError(f"CIFAR-10 batch {str(path)!r} does not hold b'data' (N, 3072) uint8 images "
                         "and b'labels', N class indices 0..9")
    return batch


@dataclass
class Split:
    """Normalised train / validation / test tensors (statistics from the training part only). `black`: the
    normalised value of a zero pixel per channel (C,), what a crop pads with (`crop_flip`)."""

    train: Pair
    val: Pair
    test: Pair
    num_classes: int
    in_channels: int
    black: torch.Tensor

    @property
    def train_val(self) -> Pair:
        """Training and validation together: what a derived architecture is retrained on."""
        return torch.cat([self.train[0], self.val[0]]), torch.cat([self.train[1], self.val[1]])


def check_tensors(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> None:
    """ValueError (naming `what`) unless x is finite (N, C, H, W) floating point and y is (N,) labels from 0."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: images have shape/type {shape}; expected a floating-point tensor (N, C, H, W)")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.long or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{what}: labels have shape/type {shape}; expected a torch.long tensor of shape ({len(x)},)")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be class indices >= 0, got minimum {int(y.min())}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: {bad} image values are NaN or infinite")


def load_data_file(path: "str | Path") -> Pair:
    """(images, labels) from a torch file (`--data-file` of search, sample and export), checked; ValueError
    naming the file otherwise. Loaded with weights_only=True: a file that would run code is refused."""
    path = Path(path)
    name = f"--data-file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{name} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file is a user error here)
        # torch's own message would suggest weights_only=False, which would run the file's code
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"{name} holds objects other than tensors and plain containers; it is not "
                             "loaded, since unpickling them could run code") from None
        detail = "" if isinstance(err, pickle.UnpicklingError) else f": {str(err).splitlines()[0]}"
        raise ValueError(f"{name} cannot be read as a torch file{detail}") from None
    if isinstance(obj, dict):
        if set(obj) != {"images", "labels"}:
            raise ValueError(f"{name} holds a dict with keys {sorted(map(str, obj))}; "
                             "expected exactly ['images', 'labels']")
        obj = (obj["images"], obj["labels"])
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{name} must hold (images, labels) or {{'images': ..., 'labels': ...}}")
    check_tensors(*obj, what=name)
    return tuple(obj)


def split_data(x: torch.Tensor, y: torch.Tensor, seed: int, val_fraction: float = 0.5, test_fraction: float = 0.2,
               test: Pair | None = None, max_train: int | None = None) -> Split:
    """Shuffles with `seed`, holds out a test part (unless `test` is given), splits the rest train/val.

    `val_fraction` is the share of the non-test data that becomes the validation set that the
    architecture is fitted on (DARTS uses half). `max_train` caps the non-test examples used.
    """
    check_tensors(x, y)
    if len(y) and len(torch.unique(y)) < 2:
        raise ValueError(f"data: all {len(y)} labels are class {int(y[0])}; a search needs at least two classes")
    fraction("val_fraction", val_fraction)
    fraction("test_fraction", test_fraction)
    x = x.to(torch.float32)  # the networks' parameter dtype (float64 or float16 images are converted)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    if test is None:
        n_test = int(round(test_fraction * len(x)))
        test = (x[order[:n_test]], y[order[:n_test]])
        order = order[n_test:]
    check_tensors(*test, what="test data")
    test = (test[0].to(torch.float32), test[1])
    if optional_integer("max_train", max_train, minimum=2) is not None:
        order = order[:max_train]
    n_val = int(round(val_fraction * len(order)))
    if n_val < 1 or len(order) - n_val < 1 or len(test[0]) < 1:
        raise ValueError(f"{len(x)} examples are too few to split into train, validation and test parts")
    train_idx, val_idx = order[n_val:], order[:n_val]
    train = (x[train_idx], y[train_idx])
    mean = train[0].mean(dim=(0, 2, 3), keepdim=True)
    std = train[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(pair: Pair) -> Pair:
        return ((pair[0] - mean) / std).contiguous(), pair[1]

    num_classes = int(max(y.max(), test[1].max())) + 1
    return Split(norm(train), norm((x[val_idx], y[val_idx])), norm(test), num_classes, x.shape[1],
                 (-mean / std).flatten())


def load_split(dataset: str, seed: int, data_dir: "str | Path | None" = None, data: Pair | None = None,
               val_fraction: float = 0.5, test_fraction: float = 0.2, max_train: int | None = None) -> Split:
    """The split for `dataset`: 'digits' (embedded), 'cifar10' or 'omniglot' (from `data_dir`), or 'tensors'
    (`data`)."""
    if dataset == "tensors":
        if data is None:
            raise ValueError("dataset='tensors' needs the (images, labels) tensors passed as data")
        return split_data(*data, seed, val_fraction, test_fraction, max_train=max_train)
    if data is not None:
        raise ValueError(f"tensors were passed as data, but dataset={dataset!r}; use dataset='tensors'")
    if dataset == "digits":
        return split_data(*load_digits(), seed, val_fraction, test_fraction, max_train=max_train)
    if dataset == "cifar10":
        if data_dir is None:
            raise ValueError("dataset='cifar10' needs data_dir: the folder holding 'cifar-10-batches-py'")
        x, y, x_test, y_test = load_cifar10(data_dir)
        return split_data(x, y, seed, val_fraction, test_fraction, test=(x_test, y_test), max_train=max_train)
    if dataset == "omniglot":
        if data_dir is None:
            raise ValueError("dataset='omniglot' needs data_dir: an Omniglot zip or a folder of them")
        return split_data(*load_omniglot_alphabets(data_dir), seed, val_fraction, test_fraction, max_train=max_train)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS) + ['tensors']}")


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short content hash, so a run can tell whether it is given the same tensors again."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bfloat16
    return h.hexdigest()[:16]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, so every step has the same size)."""
    integer("batch_size", batch_size)
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} examples available; choose a smaller one")
    return n // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a function of (seed, epoch) only, so a resumed run needs just its position."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def crop_flip(x: torch.Tensor, generator: torch.Generator, fill: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DARTS's and NAS-Bench-201's training augmentation, per image: a random crop of the image padded by `pad`
    pixels of `fill` (per channel: the normalised black that torchvision's RandomCrop pads with), then a
    horizontal flip with probability 1/2."""
    n, c, h, w = x.shape
    padded = fill.to(x.dtype).view(1, c, 1, 1).repeat(n, 1, h + 2 * pad, w + 2 * pad)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.empty_like(x)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flip else crop
    return out


def epoch_batches(data: Pair, batch_size: int, seed: int, epoch: int, start: int = 0,
                  augment: torch.Tensor | None = None) -> Iterator[Pair]:
    """The batches of `epoch` from batch index `start` on, in the order `epoch_order` fixes. `augment`: the
    `Split.black` fill with which each batch is randomly cropped and flipped (`crop_flip`), by draws that are a
    function of (seed, epoch, batch index), so a resumed run sees the same images."""
    x, y = data
    order = epoch_order(len(x), seed, epoch)
    for step in range(start, steps_per_epoch(len(x), batch_size)):
        idx = order[step * batch_size:(step + 1) * batch_size]
        if augment is None:
            yield x[idx], y[idx]
        else:
            g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + step)
            yield crop_flip(x[idx], g, augment), y[idx]
