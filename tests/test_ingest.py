"""Ingest: bad files are reported and left out, odd formats are read, real SEM images decode."""

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
from tests.helpers import IMAGE_SUFFIXES, compose_config, tiny_training_overrides

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
    datamodule = SEMDataModule(str(tmp_path / "sem"), num_workers=0)
    assert "Unlabelled" not in datamodule.class_names
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
    datamodule = SEMDataModule(str(tiny_sem_dir), num_workers=0)
    datamodule.data_config = dict(
        input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )  # fmt: skip
    datamodule.setup()
    samples = datamodule.external_samples(real_sem_dir / "external", datamodule.class_names)
    assert len(samples) == 42
    blood = next(s for s in samples if s.path.name == "SEM_image_of_blood_cells.jpg")
    assert blood.size == (1000, 1063) and abs(blood.crop_box[3] - 1001) <= 4
    dataset = datamodule.image_dataset(samples)
    for index in range(len(samples)):
        image, label = dataset[index]
        assert image.shape == (3, 224, 224) and label == samples[index].label
