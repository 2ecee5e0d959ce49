import pickle

import numpy as np
import pytest
import torch

from supernet import data


def test_digits_are_real_and_normalised_by_training_statistics():
    x, y = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    split = data.load_split("digits", seed=0)
    n = [len(split.train[0]), len(split.val[0]), len(split.test[0])]
    assert sum(n) == 1797 and n[2] == round(0.2 * 1797) and abs(n[0] - n[1]) <= 1
    assert abs(float(split.train[0].mean())) < 1e-4 and abs(float(split.train[0].std()) - 1) < 1e-3
    assert split.num_classes == 10 and split.in_channels == 1


def test_split_is_a_function_of_the_seed_and_parts_are_disjoint():
    x = torch.arange(100, dtype=torch.float32).reshape(100, 1, 1, 1)
    y = torch.arange(100) % 3
    a, b, c = (data.split_data(x, y, seed) for seed in (1, 1, 2))
    assert torch.equal(a.train[0], b.train[0]) and not torch.equal(a.train[0], c.train[0])
    # Labels 0..99 identify the examples: the three parts partition them.
    y_unique = torch.arange(100)
    s = data.split_data(x, y_unique, 1)
    parts = [set(p[1].tolist()) for p in (s.train, s.val, s.test)]
    assert set().union(*parts) == set(range(100)) and sum(len(p) for p in parts) == 100


def test_epoch_order_resumes_from_a_position():
    x, y = torch.randn(50, 1, 2, 2), torch.arange(50)
    full = list(data.epoch_batches((x, y), 8, seed=3, epoch=2))
    tail = list(data.epoch_batches((x, y), 8, seed=3, epoch=2, start=4))
    assert len(full) == 50 // 8 and len(tail) == len(full) - 4
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail, strict=True))
    other = list(data.epoch_batches((x, y), 8, seed=3, epoch=3))
    assert not torch.equal(full[0][1], other[0][1])


def test_crop_flip_takes_a_window_of_the_black_padded_image_flipped_or_not():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    black = torch.tensor([-1.5, -2.0, -0.5])
    out = data.crop_flip(x, torch.Generator().manual_seed(1), black, pad=4)
    padded = black.view(1, 3, 1, 1).repeat(64, 1, 16, 16)
    padded[:, :, 4:12, 4:12] = x
    found = set()
    for i in range(64):
        windows = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if flip else
                                  padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert windows, f"image {i} is no window of its padded image"
        found.add(windows[0][2])
    assert found == {False, True}  # both flipped and unflipped images among 64
    unpadded = data.crop_flip(x, torch.Generator().manual_seed(1), black, pad=0)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(unpadded, x))


def test_augmented_batches_are_a_function_of_seed_epoch_and_position():
    raw = torch.rand(80, 2, 6, 6) * 255
    raw[:, :, 0, 0] = 0  # a black pixel in every image: normalised, it is what crops pad with
    split = data.split_data(raw, torch.arange(80) % 4, seed=0)
    torch.testing.assert_close(split.train[0][:, :, 0, 0], split.black.expand(len(split.train[0]), 2))
    full = list(data.epoch_batches(split.train, 8, seed=3, epoch=2, augment=split.black))
    tail = list(data.epoch_batches(split.train, 8, seed=3, epoch=2, start=2, augment=split.black))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail, strict=True))
    plain = list(data.epoch_batches(split.train, 8, seed=3, epoch=2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full, plain, strict=True))  # the same examples
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain, strict=True))  # other pixels


def test_cifar10_is_read_from_its_python_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    x, y, xt, yt = data.load_cifar10(tmp_path)
    assert x.shape == (20, 3, 32, 32) and xt.shape == (4, 3, 32, 32)
    assert y.tolist() == [0, 1, 2, 9] * 5
    first = pickle.load(open(folder / "data_batch_1", "rb"))[b"data"][0]
    assert torch.allclose(x[0].flatten(), torch.from_numpy(first).float() / 255)
    split = data.load_split("cifar10", seed=0, data_dir=tmp_path)
    assert len(split.test[0]) == 4 and split.num_classes == 10


def test_missing_or_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="CIFAR-10 not found"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load_split("cifar10", seed=0)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.load_split("mnist", seed=0)
    with pytest.raises(ValueError, match="expected a floating-point tensor"):
        data.split_data(torch.zeros(10, 8, 8), torch.zeros(10, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="larger than the 5 examples"):
        data.steps_per_epoch(5, 8)


def test_fingerprint_tells_tensors_apart():
    x = torch.randn(4, 1, 2, 2)
    assert data.fingerprint(x) == data.fingerprint(x.clone())
    assert data.fingerprint(x) != data.fingerprint(x + 1)


def _cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9],
                 b"batch_label": b"training batch", b"filenames": [b"a.png"] * 4}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


class _RunsCode:
    """A pickle payload that, unpickled by plain pickle.load, would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder = _cifar_folder(tmp_path)
    marker = tmp_path / "marker"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_1' is not a CIFAR-10 python batch: it refers to io.open"):
        data.load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"garbage, not a pickle", "is not a CIFAR-10 python batch"),
    (pickle.dumps([1, 2, 3]), "does not hold b'data'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "does not hold b'data'"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "class indices 0..9"),
])
def test_a_damaged_cifar_batch_is_named(content, message, tmp_path):
    folder = _cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        data.load_cifar10(tmp_path)
    assert str(folder / "test_batch") in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_images_are_converted_to_float32(dtype):
    x, y = torch.rand(60, 1, 4, 4).to(dtype), torch.arange(60) % 3
    split = data.split_data(x, y, seed=0)
    assert all(part[0].dtype == torch.float32 for part in (split.train, split.val, split.test))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused_naming_the_data(bad):
    x, y = torch.rand(60, 1, 4, 4), torch.arange(60) % 3
    x[5, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="data: 1 image values are NaN or infinite"):
        data.split_data(x, y, seed=0)


def test_single_class_data_is_refused():
    with pytest.raises(ValueError, match="all 60 labels are class 2; a search needs at least two classes"):
        data.split_data(torch.rand(60, 1, 4, 4), torch.full((60,), 2), seed=0)


def test_fingerprint_reads_every_dtype():
    x = torch.randn(4, 1, 2, 2)
    assert data.fingerprint(x.bfloat16()) != data.fingerprint(x.half())
    assert len(data.fingerprint(x.bfloat16(), torch.arange(4))) == 16


def _omniglot_zip(path, drawings):
    """A zip in Omniglot's layout: `drawings` maps (alphabet, character, file) to a 0/1 numpy image."""
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(path, "w") as archive:
        for (alphabet, character, file), strokes in drawings.items():
            buffer = io.BytesIO()
            Image.fromarray(((1 - strokes) * 255).astype(np.uint8)).save(buffer, format="PNG")  # strokes are black
            archive.writestr(f"images_background/{alphabet}/{character}/{file}", buffer.getvalue())
    return path


def test_omniglot_alphabets_are_the_classes_and_shared_drawings_count_once(tmp_path):
    rng = np.random.default_rng(0)
    drawing = lambda: (rng.random((20, 20)) < 0.3).astype(np.float32)  # noqa: E731
    shared = {("Latin", "a", "1.png"): drawing(), ("Latin", "a", "2.png"): drawing()}
    _omniglot_zip(tmp_path / "one.zip", {**shared, ("Greek", "alpha", "1.png"): drawing()})
    _omniglot_zip(tmp_path / "two.zip", {**shared, ("Aramaic", "x", "1.png"): drawing()})
    x, y = data.load_omniglot_alphabets(tmp_path, image_size=20)
    assert x.shape == (4, 1, 20, 20) and x.dtype == torch.float32  # the shared Latin drawings once
    # Sorted by (alphabet, character, file); alphabets numbered in name order: Aramaic 0, Greek 1, Latin 2.
    assert y.tolist() == [0, 1, 2, 2]
    assert torch.allclose(x[2, 0], torch.from_numpy(shared[("Latin", "a", "1.png")]), atol=1e-6)  # strokes are 1


def test_omniglot_needs_a_path_and_two_alphabets(tmp_path):
    import supernet

    with pytest.raises(ValueError, match="dataset='omniglot' needs data_dir"):
        supernet.search(dataset="omniglot", run_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="does not exist"):
        data.load_omniglot_alphabets(tmp_path / "nowhere")
    _omniglot_zip(tmp_path / "one.zip", {("Latin", "a", "1.png"): np.ones((8, 8), np.float32)})
    with pytest.raises(ValueError, match="holds 1 alphabets; classifying them needs at least two"):
        data.load_omniglot_alphabets(tmp_path / "one.zip")


def test_omniglot_background_sets_are_eight_alphabets_at_32_pixels(data_dir):
    split = data.load_split("omniglot", seed=0, data_dir=data_dir / "omniglot")
    x, y = data.load_omniglot_alphabets(data_dir / "omniglot")
    # 4,840 distinct drawings: the two zips hold 5,840, 1,000 of them (Greek and Latin) in both.
    assert x.shape == (4840, 1, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.bincount(y).tolist() == [480, 440, 480, 940, 800, 520, 840, 340]
    assert split.num_classes == 8 and split.in_channels == 1 and len(split.test[0]) == round(0.2 * 4840)
