"""Omniglot (Lake et al. 2015) read straight from its zip files: `<split>/<alphabet>/<character>/*.png`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import read_omniglot
from .episodes import FewShotDataset, fewshot_dataset, with_rotations


def load_omniglot(path: "str | Path", image_size: int = 28, rotations: bool = True) -> FewShotDataset:
    """Omniglot characters as classes, images resized to `image_size` (strokes 1, background 0).

    `path` is a zip or a folder of zips; a character that appears in several zips (the small
    background sets share 50) is one class, its drawings counted once. With `rotations`, each
    character rotated by 90, 180 and 270 degrees is a further class in the same group.
    """
    drawings = read_omniglot(path, image_size)
    characters: dict[tuple[str, str], list[np.ndarray]] = {}
    for (alphabet, character, _), image in sorted(drawings.items()):
        characters.setdefault((alphabet, character), []).append(image)
    images, labels = [], []
    for label, key in enumerate(sorted(characters)):
        images += characters[key]
        labels += [label] * len(characters[key])
    x = torch.from_numpy(np.stack(images)).unsqueeze(1).clamp_(0.0, 1.0)
    dataset = fewshot_dataset(x, torch.tensor(labels), "omniglot")
    return with_rotations(dataset) if rotations else dataset
