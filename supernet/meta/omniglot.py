"""Omniglot (Lake et al. 2015) read straight from its zip files: `<split>/<alphabet>/<character>/*.png`."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import checks
from .episodes import FewShotDataset, fewshot_dataset, with_rotations

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


def load_omniglot(path: "str | Path", image_size: int = 28, rotations: bool = True) -> FewShotDataset:
    """Omniglot characters as classes, images resized to `image_size` (strokes 1, background 0).

    `path` is a zip or a folder of zips; a character that appears in several zips (the small
    background sets share 50) is one class, its drawings counted once. With `rotations`, each
    character rotated by 90, 180 and 270 degrees is a further class in the same group.
    """
    from PIL import Image

    checks.integer("image_size", image_size, minimum=4)
    drawings: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for zip_path in omniglot_zips(path):
        try:
            archive = zipfile.ZipFile(zip_path)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"{str(zip_path)!r} is not a readable zip file ({err})") from None
        with archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue  # folders and anything outside <split>/<alphabet>/<character>/<file>.png
                key = (parts[1], parts[2])
                if parts[3] in drawings.get(key, {}):
                    continue
                try:
                    with Image.open(io.BytesIO(archive.read(name))) as im:
                        small = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
                except (*_UNREADABLE, Image.DecompressionBombError) as err:
                    raise ValueError(f"cannot read image {name!r} in {str(zip_path)!r}: {err}") from None
                drawings.setdefault(key, {})[parts[3]] = 1.0 - np.asarray(small, dtype=np.float32) / 255.0
    if not drawings:
        raise ValueError(f"no Omniglot images under {str(path)!r}; expected <split>/<alphabet>/<character>/*.png")
    images, labels = [], []
    for label, key in enumerate(sorted(drawings)):
        for file in sorted(drawings[key]):
            images.append(drawings[key][file])
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).unsqueeze(1).clamp_(0.0, 1.0)
    dataset = fewshot_dataset(x, torch.tensor(labels), "omniglot")
    return with_rotations(dataset) if rotations else dataset
