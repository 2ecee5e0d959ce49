"""Few-shot episodes: class splits that never leak, correct N-way K-shot sampling, Omniglot reading."""

import io
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from supernet.meta import (
    EpisodeSampler,
    FewShotDataset,
    digits_fewshot,
    fewshot_dataset,
    load_omniglot,
    split_by_class,
    with_rotations,
)


def labelled_images(num_classes: int, per_class: int, size: int = 4):
    """Images whose pixel (0, 0) is the class id and pixel (0, 1) a unique example id, so tests can trace them."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = torch.zeros(len(labels), 1, size, size)
    x[:, 0, 0, 0] = labels.float()
    x[:, 0, 0, 1] = torch.arange(len(labels)).float()
    return x, labels


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(3, 12), rotate=st.booleans(), seed=st.integers(0, 10_000),
       train=st.floats(0.2, 0.7), val=st.floats(0.1, 0.3))
def test_splits_partition_the_classes_and_keep_rotations_together(groups, rotate, seed, train, val):
    x, y = labelled_images(groups, 3)
    dataset = fewshot_dataset(x, y)
    if rotate:
        dataset = with_rotations(dataset)
    splits = split_by_class(dataset, (train, val, 1.0 - train - val), seed)
    class_sets = {name: set(s.classes.tolist()) for name, s in splits.items()}
    group_sets = {name: set(dataset.groups[s.classes].tolist()) for name, s in splits.items()}
    assert all(class_sets.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not class_sets[a] & class_sets[b]
        assert not group_sets[a] & group_sets[b]  # no rotation of a class in another split
    assert set().union(*class_sets.values()) == set(dataset.classes.tolist())
    assert sum(len(s.labels) for s in splits.values()) == len(dataset.labels)


@settings(max_examples=20, deadline=None)
@given(n_way=st.integers(1, 5), k_shot=st.integers(1, 3), query=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_episodes_draw_only_their_split_with_consistent_labels(n_way, k_shot, query, seed):
    x, y = labelled_images(10, 6)
    rotated = with_rotations(fewshot_dataset(x, y))  # 40 classes, rotations of a group stay together
    # each image becomes the constant of its row index, so an episode's images trace back to their rows
    rows = torch.arange(len(rotated.labels)).float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    dataset = FewShotDataset(rows.clone(), rotated.labels, rotated.groups)
    splits = split_by_class(dataset, (0.6, 0.2, 0.2), seed=seed)
    seen = {}
    for name, split in splits.items():
        sampler = EpisodeSampler(split, min(n_way, split.num_classes), k_shot, query, seed)
        n = sampler.n_way
        for _ in range(3):
            e = sampler.sample()
            assert e.support_x.shape == (n * k_shot, 1, 4, 4) and e.query_x.shape == (n * query, 1, 4, 4)
            assert sorted(e.support_y.tolist()) == sorted(list(range(n)) * k_shot)
            assert sorted(e.query_y.tolist()) == sorted(list(range(n)) * query)
            assert len(set(e.classes.tolist())) == n
            support_rows, query_rows = e.support_x[:, 0, 0, 0].long(), e.query_x[:, 0, 0, 0].long()
            # every image's true class is the class its episode label stands for
            assert torch.equal(dataset.labels[support_rows], e.classes[e.support_y])
            assert torch.equal(dataset.labels[query_rows], e.classes[e.query_y])
            assert not set(support_rows.tolist()) & set(query_rows.tolist())  # no example in both sets
            assert len(set(support_rows.tolist())) == len(support_rows)
            seen.setdefault(name, set()).update(e.classes.tolist())
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    for name, classes in seen.items():
        assert classes <= set(splits[name].classes.tolist())


def test_sampler_is_deterministic_and_resumable():
    dataset = digits_fewshot()
    a = EpisodeSampler(dataset, 5, 1, 3, seed=7)
    b = EpisodeSampler(dataset, 5, 1, 3, seed=7)
    first = [a.sample() for _ in range(2)]
    assert all(torch.equal(e.query_x, b.sample().query_x) for e in first)
    state = a.state_dict()
    expected = a.sample_tasks(3)
    a.load_state_dict(state)
    again = a.sample_tasks(3)
    assert torch.equal(expected.support_x, again.support_x) and torch.equal(expected.classes, again.classes)
    assert not torch.equal(first[0].support_x, first[1].support_x)


def test_rotations_are_extra_classes_of_the_same_group():
    x, y = labelled_images(3, 2)
    x[:, 0, 1, 0] = 5.0  # break the symmetry so each rotation differs
    rotated = with_rotations(fewshot_dataset(x, y))
    assert rotated.num_classes == 12 and len(rotated.labels) == 4 * len(y)
    cls = 2 * 4 + 1  # class 2 rotated by 90 degrees
    assert torch.equal(rotated.images[rotated.labels == cls], torch.rot90(x[y == 2], 1, dims=(2, 3)))
    assert rotated.groups[8:12].tolist() == [2, 2, 2, 2]


def test_digits_default_has_forty_classes_split_by_digit():
    splits = split_by_class(digits_fewshot())
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 24, "val": 8, "test": 8}


@pytest.mark.parametrize("kwargs, words", [
    ({"n_way": 9}, ["n_way=9", "8 classes"]),
    ({"k_shot": 100, "query": 100}, ["k_shot + query", "200", "examples of class"]),
    ({"n_way": 0}, ["n_way must be a positive integer"]),
    ({"k_shot": True}, ["k_shot must be a positive integer, got True"]),
])
def test_sampler_rejects_impossible_episodes(kwargs, words):
    test_split = split_by_class(digits_fewshot())["test"]
    args = {"n_way": 5, "k_shot": 1, "query": 5, **kwargs}
    with pytest.raises(ValueError) as err:
        EpisodeSampler(test_split, **args)
    for word in words:
        assert word in str(err.value)


def test_bad_tensors_and_fractions_are_clear_errors():
    x, y = labelled_images(4, 2)
    with pytest.raises(ValueError, match="expected a float tensor"):
        fewshot_dataset(x[:, 0], y)
    with pytest.raises(ValueError, match="integer class ids"):
        fewshot_dataset(x, y.float())
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_class(fewshot_dataset(x, y), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="split fraction val must be a positive finite number, got nan"):
        split_by_class(fewshot_dataset(x, y), (0.5, float("nan"), 0.5))  # NaN once slipped past the sum check
    with pytest.raises(ValueError, match="three positive numbers"):
        split_by_class(fewshot_dataset(x, y), (0.5, 0.5))
    with pytest.raises(ValueError, match="at least 3"):
        split_by_class(fewshot_dataset(x[:4], y[:4]))


def test_missing_omniglot_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "omniglot.zip"
    with pytest.raises(ValueError, match="does not exist"):
        load_omniglot(missing)
    with pytest.raises(ValueError, match="no .zip files"):
        load_omniglot(tmp_path)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.zip' is not a readable zip"):
        load_omniglot(tmp_path)
    (tmp_path / "broken.zip").unlink()
    (tmp_path / "folder.zip").mkdir()
    with pytest.raises(ValueError, match="folder.zip' is not a readable zip"):
        load_omniglot(tmp_path)


def png_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("bad", [b"", b"not an image", png_bytes()[:60], png_bytes()[:120]],
                         ids=["empty", "text", "cut-in-header-chunks", "cut-in-pixel-data"])
def test_an_unreadable_image_in_a_zip_names_the_zip_and_the_member(tmp_path, bad):
    zip_path = omniglot_zip(tmp_path / "images_background.zip", {
        "images_background/Alpha/character01/01.png": png_bytes(1),
        "images_background/Alpha/character01/02.png": bad})
    with pytest.raises(ValueError) as err:
        load_omniglot(zip_path)
    assert "images_background/Alpha/character01/02.png" in str(err.value) and str(zip_path) in str(err.value)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                  max_size=3))
def test_a_damaged_png_either_loads_or_is_a_clear_error(tmp_path_factory, cut, flips):
    data = bytearray(png_bytes())
    for where, value in flips:
        data[where % len(data)] = value
    data = data[:len(data) - cut % len(data)] if cut % 2 else data
    zip_path = omniglot_zip(tmp_path_factory.mktemp("zip") / "omniglot.zip", {
        "images_background/Alpha/character01/01.png": bytes(data)})
    try:
        dataset = load_omniglot(zip_path, image_size=8, rotations=False)
    except ValueError as err:
        assert "01.png" in str(err) and str(zip_path) in str(err)
    else:
        assert dataset.image_shape == (1, 8, 8) and torch.isfinite(dataset.images).all()


def test_a_zip_member_with_a_bad_checksum_names_the_zip_and_the_member(tmp_path):
    good = png_bytes()
    zip_path = omniglot_zip(tmp_path / "omniglot.zip", {"images_background/Alpha/character01/01.png": good})
    raw = zip_path.read_bytes()
    at = raw.index(good[20:40])  # stored uncompressed: flip a byte of the member's data
    zip_path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    with pytest.raises(ValueError, match="01.png' in .*omniglot.zip'.*CRC"):
        load_omniglot(zip_path)


def test_omniglot_reader(data_dir):
    small1 = data_dir / "omniglot" / "images_background_small1.zip"
    one = load_omniglot(small1, rotations=False)
    assert one.num_classes == 136 and one.image_shape == (1, 28, 28)
    assert set(one.class_sizes().values()) == {20}  # 20 drawers per character
    assert 0.0 <= one.images.min() and one.images.max() <= 1.0
    assert one.images.mean() < 0.3  # strokes are 1 on a 0 background, and strokes are thin
    both = load_omniglot(data_dir / "omniglot", image_size=20)  # both zips: 242 distinct characters
    assert both.num_classes == 4 * 242 and both.image_shape == (1, 20, 20)
    splits = split_by_class(both)
    groups = [set(both.groups[s.classes].tolist()) for s in splits.values()]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    episode = EpisodeSampler(splits["test"], 20, 1, 19, seed=0).sample()
    assert episode.query_x.shape == (20 * 19, 1, 20, 20)
