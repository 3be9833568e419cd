"""Leakage-safe splits: duplicate groups stay together; manifests are seeded, reusable, checked."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.ingest import check_image
from sem_cls.data.manifest import fingerprint, read_manifest
from sem_cls.data.splits import NEAR_DUPLICATE_BITS, duplicate_groups
from sem_cls.errors import UserError
from tests.helpers import split_manifest


def near_copies(image: Image.Image) -> dict[str, Image.Image]:
    """What a near-duplicate looks like: another encode, size, exposure, or a 1% shift (periodic
    patterns shifted by 2% or more can move the hash past the threshold)."""
    width, height = image.size
    return {
        "reencoded": image,
        "smaller": image.resize((width * 4 // 5, height * 4 // 5)),
        "brighter": ImageEnhance.Brightness(image).enhance(1.15),
        "shifted": image.crop((width // 100, height // 100, width, height)),
    }


def save_jpeg(image: Image.Image, path: Path, quality: int = 70) -> None:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def planted_dir(tiny_sem_dir, tmp_path_factory) -> Path:
    """The tiny set with, per class, an exact copy and four near copies of its first image."""
    root = tmp_path_factory.mktemp("planted") / "sem"
    shutil.copytree(tiny_sem_dir, root)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        original = sorted(class_dir.glob("*.jpg"))[0]
        shutil.copy(original, class_dir / "zz_exact_copy.jpg")
        for name, image in near_copies(Image.open(original)).items():
            save_jpeg(image, class_dir / f"zz_{name}.jpg")
    return root


def phash_bits(path: Path) -> int:
    return int(check_image(path)["phash"], 16)


def test_near_duplicate_threshold_separates_copies_from_other_images(tiny_sem_dir, tmp_path):
    originals = sorted(tiny_sem_dir.glob("*/*.jpg"))
    hashes = np.array([phash_bits(p) for p in originals], dtype=np.uint64)
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    distinct = distances[np.triu_indices(len(hashes), 1)]
    # Different generated specimens, even of one class, are far apart ...
    assert distinct.min() > NEAR_DUPLICATE_BITS + 2
    # ... while every kind of near copy stays within the threshold.
    for path in originals:
        for name, image in near_copies(Image.open(path)).items():
            save_jpeg(image, tmp_path / f"{name}.jpg")
            distance = (phash_bits(path) ^ phash_bits(tmp_path / f"{name}.jpg")).bit_count()
            assert distance <= NEAR_DUPLICATE_BITS, (path.name, name, distance)


def test_groups_join_exact_and_near_duplicates_transitively():
    sha = ["a", "b", "a", "c", "d"]
    phash = [
        "0000000000000000",
        "00000000000000ff",
        "ffffffffffffffff",
        "000000000000000f",
        "ff00ff00ff00ff00",
    ]
    # 0 = 2 by content; 0 ~ 3 (4 bits); 3 ~ 1 (4 bits); 4 stands alone.
    groups = duplicate_groups(sha, phash, max_bits=4)
    assert groups.tolist() == [0, 0, 0, 0, 1]
    assert duplicate_groups(sha, phash, max_bits=-1).tolist() == [0, 1, 0, 2, 3]


def test_planted_duplicates_land_in_one_split(planted_dir):
    for seed in range(3):
        rows = {row["path"]: row for row in split_manifest(planted_dir, seed=seed).rows}
        for class_dir in sorted(p for p in planted_dir.iterdir() if p.is_dir()):
            original = sorted(class_dir.glob("*.jpg"))[0].relative_to(planted_dir).as_posix()
            family = [original] + [
                p.relative_to(planted_dir).as_posix() for p in class_dir.glob("zz_*.jpg")
            ]
            assert len({rows[path]["group"] for path in family}) == 1, family
            assert len({rows[path]["split"] for path in family}) == 1, family
        # No group straddles two splits anywhere.
        split_of_group = {}
        for row in rows.values():
            assert split_of_group.setdefault(row["group"], row["split"]) == row["split"]


def test_same_seed_same_manifest_other_seed_other_split(planted_dir):
    first = split_manifest(planted_dir, seed=7)
    second = split_manifest(planted_dir, seed=7)
    other = split_manifest(planted_dir, seed=8)
    assert first.rows == second.rows
    assert first.fingerprint() == second.fingerprint()
    assert other.fingerprint() != first.fingerprint()
    assert [r["split"] for r in other.rows] != [r["split"] for r in first.rows]


def test_a_saved_manifest_reproduces_the_split_and_detects_changed_images(planted_dir, tmp_path):
    original = split_manifest(planted_dir, seed=5)
    saved = original.write(tmp_path / "run" / "manifest.csv")
    assert fingerprint(read_manifest(saved)) == original.fingerprint()
    reused = split_manifest(planted_dir, manifest=saved)
    assert reused.fingerprint() == original.fingerprint()
    assert reused.samples("test") == original.samples("test")

    edited = tmp_path / "edited"
    shutil.copytree(planted_dir, edited)
    victim = sorted((edited / "Tips").glob("*.jpg"))[2]
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    with pytest.raises(UserError, match=r"1 images of data.manifest=.* changed .* Tips/"):
        split_manifest(edited, manifest=saved)


def test_k_folds_rotate_validation_over_train_and_keep_test_fixed(planted_dir):
    folds = [split_manifest(planted_dir, folds=3, fold=k, ratios=(0.6, 0.2, 0.2)) for k in range(3)]
    manifests = [{r["path"]: r for r in manifest.rows} for manifest in folds]
    paths = sorted(manifests[0])
    test = [{p for p in paths if m[p]["split"] == "test"} for m in manifests]
    val = [{p for p in paths if m[p]["split"] == "val"} for m in manifests]
    assert test[0] == test[1] == test[2]
    assert not (val[0] & val[1]) and not (val[1] & val[2]) and not (val[0] & val[2])
    assert val[0] | val[1] | val[2] == set(paths) - test[0]
    for manifest in manifests:  # groups stay whole in every fold
        split_of_group = {}
        for row in manifest.values():
            assert split_of_group.setdefault(row["group"], row["split"]) == row["split"]
    with pytest.raises(UserError, match=r"data.fold=3 must be an integer in 0..2"):
        split_manifest(planted_dir, folds=3, fold=3)


def test_balanced_sampler_draws_rare_classes_as_often_as_common_ones(tiny_sem_dir, tmp_path):
    root = tmp_path / "imbalanced"
    shutil.copytree(tiny_sem_dir, root)
    for extra in sorted((root / "Tips").glob("*.jpg")):  # Tips three times as large
        for copy in range(2):
            image = Image.open(extra).rotate(90 * (copy + 1), expand=True)
            save_jpeg(image, root / "Tips" / f"{extra.stem}_rot{copy}.jpg", quality=90)
    datamodule = SEMDataModule(
        split_manifest(root), {}, num_workers=0, sampler="balanced", batch_size=64
    )
    counts = datamodule.class_counts("train")
    tips = datamodule.class_names.index("Tips")
    assert counts[tips] >= 2.5 * np.median(counts)
    datamodule.data_config = dict(
        input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0, crop_mode="center",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )  # fmt: skip
    datamodule.setup("fit")
    torch.manual_seed(0)
    sampler = datamodule.train_dataloader().sampler  # the draws, without decoding images
    train = datamodule.samples["train"]
    drawn = []
    for epoch in range(50):  # as Lightning's fit loop: a new draw every epoch
        sampler.set_epoch(epoch)
        drawn += [train[i].label for i in sampler]
    drawn = torch.tensor(drawn)
    shares = torch.bincount(drawn, minlength=len(counts)).float() / len(drawn)
    assert shares.max() - shares.min() < 0.05, shares
