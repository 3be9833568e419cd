"""The data module's split and the info-bar crop."""

import numpy as np
import pytest
from PIL import Image

from sem_cls.data.infobar import InfoBarCrop
from sem_cls.data.splits import group_split
from sem_cls.data.synthetic import CLASSES, render_image
from sem_cls.errors import DataNotFoundError, UserError
from tests.helpers import split_manifest


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.array([c for c in range(4) for _ in range(20)])
    groups = np.arange(80)  # no duplicates
    split = group_split(labels, groups, (0.5, 0.25, 0.25), seed=1)
    for index, size in ((0, 10), (1, 5), (2, 5)):
        counts = np.bincount(labels[split == index], minlength=4)
        assert counts.tolist() == [size] * 4, index
    assert (split == group_split(labels, groups, (0.5, 0.25, 0.25), seed=1)).all()
    assert (split != group_split(labels, groups, (0.5, 0.25, 0.25), seed=2)).any()


def test_split_ratios_must_be_three_positive_shares_of_one():
    with pytest.raises(UserError, match=r"data.split=\[0.5, 0.5, 0.0\]"):
        group_split(np.array([0, 1] * 10), np.arange(20), (0.5, 0.5, 0.0), seed=0)


def test_class_too_small_to_split_is_a_clear_error_naming_it(tmp_path):
    for name, count in (("Fibres", 2), ("Tips", 12)):
        (tmp_path / name).mkdir()
        for index in range(count):
            image = render_image(name, np.random.default_rng(index), info_bar=None)
            image.resize((128, 96)).save(tmp_path / name / f"{index}.jpg")
    with pytest.raises(UserError, match="Class 'Fibres' has too few images to split"):
        split_manifest(tmp_path)


def test_manifest_reads_the_folder_layout(tiny_sem_dir):
    manifest = split_manifest(tiny_sem_dir, seed=3)
    assert manifest.class_names == sorted(CLASSES)
    samples = [s for split in ("train", "val", "test") for s in manifest.samples(split)]
    assert sorted(s.path for s in samples) == sorted(tiny_sem_dir.glob("*/*.jpg"))
    assert all(manifest.class_names[s.label] == s.path.parent.name for s in samples)
    again = split_manifest(tiny_sem_dir, seed=3)
    assert again.fingerprint() == manifest.fingerprint()
    assert split_manifest(tiny_sem_dir, seed=4).fingerprint() != again.fingerprint()


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "Particles").mkdir()
    with pytest.raises(DataNotFoundError, match="holds no <Class>/ folders with usable images"):
        split_manifest(tmp_path)


@pytest.mark.parametrize("kind", ["bright", "dark"])
def test_generated_info_bar_is_cropped(kind):
    image = render_image("Particles", np.random.default_rng(0), info_bar=kind)
    assert InfoBarCrop("auto").crop_box(image) == (0, 0, 1024, 768 - 60)


def test_image_without_bar_is_not_cropped():
    image = render_image("Particles", np.random.default_rng(0), info_bar=None)
    assert InfoBarCrop("auto").crop_box(image) == (0, 0, 1024, 768)


def test_fixed_and_no_crop_modes():
    image = Image.new("RGB", (100, 80))
    assert InfoBarCrop(10)(image).size == (100, 70)
    assert InfoBarCrop("none")(image).size == (100, 80)
    with pytest.raises(ValueError, match="'top'"):
        InfoBarCrop("top")


def test_real_sem_bars_are_cropped_and_clean_images_kept(real_sem_dir):
    crop = InfoBarCrop("auto")
    nffa = real_sem_dir / "Nanowires" / "L6_0a6f18702a4a32677c74ed390f3af7af.jpg"
    with Image.open(nffa) as image:
        # This NFFA image's white bar starts at row 630.
        assert abs(crop.crop_box(image)[3] - 630) <= 3
    for path in sorted((real_sem_dir / "external" / "Nanowires").glob("*.png")):
        with Image.open(path) as image:
            assert crop.crop_box(image) == (0, 0, *image.size), path.name
