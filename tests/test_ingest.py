"""Ingest: bad files are reported and left out, odd formats are read, real SEM images decode."""

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from sem_cls.data import ingest as ingest_module
from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.images import open_image
from sem_cls.data.ingest import check_image, ingest
from sem_cls.data.manifest import labelled_samples
from tests.helpers import IMAGE_SUFFIXES, compose_config, split_manifest, tiny_training_overrides

BAD_FILES = {
    "Particles/truncated.jpg": "truncated",
    "Particles/empty.jpg": "empty",
    "Fibres/notes.jpg": "not an image",
    "Fibres/readme.txt": "not an image",
}


def write_odd_formats(folder: Path, source: Path) -> list[str]:
    """A 16-bit grayscale TIFF, an RGBA PNG and a palette GIF-like PNG made from `source`."""
    gray = np.asarray(Image.open(source).convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 64 + 1000).save(folder / "wide.tif")  # 16-bit, not the full range
    Image.open(source).convert("RGBA").save(folder / "alpha.png")
    Image.open(source).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    return ["wide.tif", "alpha.png", "palette.png"]


@pytest.fixture(scope="module")
def salted_dir(tiny_sem_dir, tmp_path_factory) -> Path:
    """The tiny generated set plus odd-but-good formats and bad files of every kind."""
    root = tmp_path_factory.mktemp("salted") / "sem"
    shutil.copytree(tiny_sem_dir, root)
    source = sorted((root / "Particles").glob("*.jpg"))[0]
    write_odd_formats(root / "Tips", source)
    data = source.read_bytes()
    (root / "Particles" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "Particles" / "empty.jpg").write_bytes(b"")
    (root / "Fibres" / "notes.jpg").write_text("magnification 20k, sample B7\n")
    (root / "Fibres" / "readme.txt").write_text("not an image\n")
    return root


def test_bad_files_are_reported_and_good_ones_kept(salted_dir, tmp_path):
    result = ingest(salted_dir, workers=1, progress=False)
    rejected = {r["path"]: ingest_module._reason(r["error"]) for r in result.rejected}
    assert rejected == BAD_FILES
    usable = {r["path"] for r in result.images}
    assert {"Tips/wide.tif", "Tips/alpha.png", "Tips/palette.png"} <= usable
    assert len(usable) == len(list(salted_dir.glob("*/*"))) - len(BAD_FILES)
    assert result.summary().endswith("left out 4 (2 not an image, 1 empty, 1 truncated)")
    report = result.write_report(tmp_path / "report.csv").read_text().splitlines()
    assert report[0] == "path,class,error" and len(report) == 1 + len(BAD_FILES)


def test_each_file_is_checked_once(salted_dir, tmp_path, monkeypatch):
    ingest(salted_dir, cache_dir=tmp_path, workers=1, progress=False)
    checked = []
    original = ingest_module._check
    monkeypatch.setattr(ingest_module, "_check", lambda job: checked.append(job) or original(job))
    again = ingest(salted_dir, cache_dir=tmp_path, workers=1, progress=False)
    assert checked == []
    touched = salted_dir / "Tips" / "alpha.png"
    Image.open(touched).convert("RGB").save(touched)  # changed content and size
    after_edit = ingest(salted_dir, cache_dir=tmp_path, workers=1, progress=False)
    assert [path.name for path, _ in checked] == ["alpha.png"]
    assert len(after_edit.images) == len(again.images)


def test_wide_and_odd_formats_are_read_as_8_bit(salted_dir):
    image, size = open_image(salted_dir / "Tips" / "wide.tif", "RGB")
    values = np.asarray(image)
    assert image.mode == "RGB" and size == image.size
    # The 16-bit values are stretched from their own range onto 0-255, not clipped at 255.
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 50
    for name in ("alpha.png", "palette.png"):
        assert open_image(salted_dir / "Tips" / name, "RGB")[0].mode == "RGB"


def test_images_over_the_pixel_limit_are_refused_unread(salted_dir):
    record = check_image(salted_dir / "Tips" / "wide.tif", max_pixels=1000)
    assert "data.max_pixels=1,000" in record["error"]
    assert ingest_module._reason(record["error"]) == "too large"


def test_training_runs_on_a_folder_with_bad_files(salted_dir, tmp_path):
    from train import train

    cfg = compose_config(
        "train", tmp_path, [*tiny_training_overrides(salted_dir), "trainer.max_epochs=1"]
    )
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    client = mlflow.MlflowClient(cfg.logger.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.logger.mlflow.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    report = Path(client.download_artifacts(run.info.run_id, "data/ingest_report.csv", tmp_path))
    assert {line.split(",")[0] for line in report.read_text().splitlines()[1:]} == set(BAD_FILES)
    manifest = (Path(cfg.paths.output_dir) / "data" / "manifest.csv").read_text()
    assert "Tips/wide.tif" in manifest and "truncated.jpg" not in manifest


def test_empty_class_folder_is_left_out_with_a_warning(tiny_sem_dir, tmp_path, caplog):
    shutil.copytree(tiny_sem_dir, tmp_path / "sem")
    (tmp_path / "sem" / "Unlabelled").mkdir()
    assert "Unlabelled" not in split_manifest(tmp_path / "sem").class_names
    assert "no usable image, left out: Unlabelled" in caplog.text


# Where the real images' bars start (None: no bar), read off the images by eye.
REAL_BARS = {
    "Nanowires/L6_0a6f18702a4a32677c74ed390f3af7af.jpg": 630,  # white NFFA bar
    "external/Biological/SEM_image_of_blood_cells.jpg": 1001,
    "external/Particles/5-Gold-nanoparticles-on-carbon.jpg": 701,
}


def test_every_real_image_decodes_and_bars_are_cropped_only_where_they_are(real_sem_dir):
    paths = [p for p in sorted(real_sem_dir.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    assert len(paths) >= 50
    for path in paths:
        record = check_image(path)
        relative = path.relative_to(real_sem_dir).as_posix()
        assert record["error"] == "", relative
        expected = REAL_BARS.get(relative)
        if expected is None:
            # NFFA crops, already-cropped PNGs, TIFFs without bar, bars painted over.
            assert record["bar_top"] == record["height"], relative
        else:
            assert abs(record["bar_top"] - expected) <= 4, relative


def test_real_external_folder_loads_cropped_for_a_model(tiny_sem_dir, real_sem_dir):
    datamodule = SEMDataModule(split_manifest(tiny_sem_dir), {}, num_workers=0)
    datamodule.data_config = dict(
        input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )  # fmt: skip
    datamodule.setup()
    samples = labelled_samples(ingest(real_sem_dir / "external"), datamodule.class_names, "auto")
    assert len(samples) == 42
    blood = next(s for s in samples if s.path.name == "SEM_image_of_blood_cells.jpg")
    assert blood.size == (1000, 1063) and abs(blood.crop_box[3] - 1001) <= 4
    dataset = datamodule.image_dataset(samples)
    for index in range(len(samples)):
        image, label = dataset[index]["image"], dataset[index]["label"]
        assert image.shape == (224, 224, 3) and label == samples[index].label


def small_folder(root: Path) -> Path:
    """Two classes of small gray PNGs, made in milliseconds."""
    for index in range(4):
        folder = root / ("A" if index % 2 else "B")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 255, (48, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_subfolders_and_links_are_used_and_a_symlink_loop_is_reported(tmp_path):
    root = small_folder(tmp_path / "sem")
    (root / "A" / "day2" / "x").mkdir(parents=True)
    shutil.copy(root / "A" / "1.png", root / "A" / "day2" / "x" / "deep.png")
    (root / "A" / ".hidden").mkdir()
    shutil.copy(root / "A" / "1.png", root / "A" / ".hidden" / "skipped.png")
    outside = small_folder(tmp_path / "elsewhere")
    (root / "B" / "linked.png").symlink_to(outside / "B" / "0.png")
    (root / "B" / "linked-folder").symlink_to(outside / "B")
    (root / "A" / "day2" / "loop").symlink_to(root / "A")  # leads back up: a loop
    (root / "A" / "self.png").symlink_to(root / "A" / "self.png")  # a link to itself

    result = ingest(root, workers=1, progress=False)
    assert {r["path"] for r in result.images} == {
        "A/1.png", "A/3.png", "A/day2/x/deep.png", "B/0.png", "B/2.png", "B/linked.png",
        "B/linked-folder/0.png", "B/linked-folder/2.png",
    }  # fmt: skip
    assert {r["path"]: r["class"] for r in result.images}["A/day2/x/deep.png"] == "A"
    rejected = {r["path"]: r["error"] for r in result.rejected}
    assert set(rejected) == {"A/day2/loop", "A/self.png"}
    assert all("symlink loop" in error for error in rejected.values())
    assert "2 symlink loop" in result.summary()

    # predict walks inputs the same way, and reports the loops instead of hanging on them
    from sem_cls.predict import image_files

    files = {p.relative_to(root).as_posix() for p in image_files(root)}
    assert files == {r["path"] for r in result.images + result.rejected}
    assert "symlink loop" in check_image(root / "A" / "day2" / "loop")["error"]


def test_a_read_error_is_reported_but_not_cached_as_a_verdict(tmp_path, monkeypatch):
    root = small_folder(tmp_path / "sem")
    victim = root / "A" / "1.png"
    read_bytes = Path.read_bytes

    def fails_once(path):
        if path == victim:
            monkeypatch.setattr(Path, "read_bytes", read_bytes)
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", fails_once)
    first = ingest(root, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert [(r["path"], r["error"]) for r in first.rejected] == [
        ("A/1.png", "could not be read: Permission denied")
    ]
    again = ingest(root, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert "A/1.png" in {r["path"] for r in again.images} and not again.rejected


def test_a_damaged_ingest_cache_is_discarded_with_a_warning(tmp_path, caplog):
    root = small_folder(tmp_path / "sem")
    expected = ingest(root, cache_dir=tmp_path / "cache", workers=1, progress=False).images
    (cache_file,) = (tmp_path / "cache").glob("*.csv")
    for damage in (os.urandom(300), b"path,class\nA/1.png", cache_file.read_bytes()[:-40]):
        cache_file.write_bytes(damage)
        assert ingest(root, cache_dir=tmp_path / "cache", workers=1, progress=False).images == (
            expected
        )
        assert f"Ingest cache {cache_file} is unreadable" in caplog.text
        caplog.clear()


def test_exif_orientation_is_applied_for_ingest_and_the_loaders(tmp_path):
    pixels = np.zeros((40, 100), np.uint8)
    pixels[:, :10] = 255  # a bright stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown rotated by 90 degrees clockwise
    path = tmp_path / "turned.png"
    Image.fromarray(pixels).save(path, exif=exif)

    image, size = open_image(path, "L")
    assert size == image.size == (40, 100), "width and height are the upright ones"
    upright = np.asarray(image)
    assert upright[:10].mean() == 255 and upright[10:].mean() == 0  # the stripe is on top
    record = check_image(path)
    assert (record["width"], record["height"]) == (40, 100)
    from sem_cls.data.samples import Sample, SEMImageDataset

    sample = Sample(path, 0, (0, 0, 40, 100), (40, 100), "")
    tensor = SEMImageDataset([sample], lambda im: np.asarray(im))[0]["image"]
    assert tensor.shape == (100, 40, 3) and (tensor[..., 0] == upright).all()


def test_a_multi_page_tiff_is_read_at_its_first_page_and_noted(tmp_path, caplog):
    root = small_folder(tmp_path / "sem")
    pages = [Image.fromarray(np.full((30, 50), value, np.uint8)) for value in (200, 10, 90)]
    pages[0].save(root / "A" / "stack.tif", save_all=True, append_images=pages[1:])
    result = ingest(root, workers=1, progress=False)
    (record,) = [r for r in result.images if r["path"] == "A/stack.tif"]
    assert record["pages"] == 3
    assert "A/stack.tif (3 pages)" in caplog.text and "first page is used" in caplog.text
    assert np.asarray(open_image(root / "A" / "stack.tif", "L")[0]).mean() == 200
