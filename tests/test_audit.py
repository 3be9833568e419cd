"""python -m sem_cls.audit: likely label errors, equal files under two classes, outliers, the
report; data.exclude acting on it without touching files; the scale read from SEM TIFFs."""

import csv
import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    LITE0,
    assert_user_error,
    run_in_process,
    run_predict,
    split_manifest,
    write_images_unlike_sem,
)

DEMO = ["experiment=demo", "data.synthetic=null", "data.num_workers=0"]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def contents(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path, with its sha256: what a user's folder holds."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def only(paths) -> Path:
    (path,) = list(paths)
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """The demo data (40 images per class) with 20 labels flipped (seeded), 5 images no SEM took
    (photos, line drawings, a page of text) planted in class folders and 3 images copied into a
    second class, audited once."""
    from sem_cls.data.synthetic import generate_dataset

    work = tmp_path_factory.mktemp("audit")
    # Half the demo's 1024x768: the backbone sees 224 pixels either way, and decoding is cheaper.
    data = generate_dataset(work / "data", images_per_class=40, seed=0, size=(512, 384))
    (data / ".sem_cls_synthetic.json").unlink()  # now the user's folder, edited by hand
    rng = random.Random(0)
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    flipped = set()
    for path in rng.sample(sorted(data.glob("*/*.jpg")), 20):
        other = rng.choice([name for name in classes if name != path.parent.name])
        path.rename(data / other / path.name)
        flipped.add(f"{other}/{path.name}")
    planted = set()
    # Photos, line drawings and a page of text: five look-alike photos would be a cluster of
    # their own, each the others' nearest neighbours, which no k-NN outlier score flags.
    write_images_unlike_sem(work / "unlike", per_kind=2)
    kinds = ("photo_0", "drawing_0", "text_0", "photo_1", "drawing_1")
    photos = [work / "unlike" / f"{kind}.png" for kind in kinds]
    for photo, name in zip(photos, classes, strict=False):
        shutil.copy(photo, data / name / photo.name)
        planted.add(f"{name}/{photo.name}")
    copied = {}
    untouched = sorted(
        p for p in data.glob("*/*.jpg") if f"{p.parent.name}/{p.name}" not in flipped
    )
    for path in rng.sample(untouched, 3):
        other = rng.choice([name for name in classes if name != path.parent.name])
        shutil.copy(path, data / other / f"copy_{path.name}")
        copied[f"{path.parent.name}/{path.name}"] = f"{other}/copy_{path.name}"
    before = contents(data)
    result = run_in_process("sem_cls.audit", f"data.data_dir={data}", *DEMO, tmp_path=work)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = only((work / "logs").rglob("audit/issues.csv")).parent
    return dict(data=data, work=work, folder=folder, before=before, flipped=flipped,
                planted=planted, copied=copied, stdout=result.stdout)  # fmt: skip


@pytest.mark.slow
def test_audit_ranks_flipped_labels_first_and_reports_copies(audited):
    issues = read_csv(audited["folder"] / "issues.csv")
    assert len(issues) == 400 + 5 + 3
    scores = [float(row["label_score"]) for row in issues]
    assert scores == sorted(scores)  # lowest label_score (most likely mislabeled) first
    ranked = [row["path"] for row in issues]
    flipped, planted = audited["flipped"], audited["planted"]
    assert len(flipped & set(ranked[:40])) >= 18, ranked[:40]
    assert len((flipped | planted) & set(ranked[:20])) >= 14, ranked[:20]
    by_path = {row["path"]: row for row in issues}
    for original, copy in audited["copied"].items():
        assert by_path[copy]["conflict"] == original
        assert by_path[original]["conflict"] == copy
    assert not any(row["conflict"] for path, row in by_path.items()
                   if path not in {*audited["copied"], *audited["copied"].values()})  # fmt: skip
    # A flipped image's suggested class is mostly the one it came from: not its given class.
    suggested_other = sum(
        by_path[p]["suggested_class"] != by_path[p]["given_class"] for p in flipped
    )
    assert suggested_other >= 18


@pytest.mark.slow
def test_images_that_are_no_sem_images_are_top_outliers(audited):
    issues = read_csv(audited["folder"] / "issues.csv")
    by_outlier = sorted(issues, key=lambda row: float(row["outlier_score"]))
    assert audited["planted"] <= {row["path"] for row in by_outlier[:10]}, by_outlier[:10]


@pytest.mark.slow
def test_audit_report_page_map_classes_and_mlflow_run(audited):
    import mlflow

    folder = audited["folder"]
    page = (folder / "audit.html").read_text()
    issues = read_csv(folder / "issues.csv")
    first = next(index for index, row in enumerate(issues) if row["is_label_issue"] == "True")
    assert f"thumbnails/{first}.png" in page and (folder / "thumbnails" / f"{first}.png").is_file()
    assert "map.png" in page and (folder / "map.png").stat().st_size > 10_000
    classes = read_csv(folder / "classes.csv")
    assert sum(int(row["images"]) for row in classes) == len(issues)
    client = mlflow.MlflowClient(f"sqlite:///{audited['work'] / 'mlruns'}/mlflow.db")
    experiment = client.get_experiment_by_name("sem-cls-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["audit/conflicts"] == 6
    names = {item.path for item in client.list_artifacts(run.info.run_id, "audit")}
    assert {"audit/issues.csv", "audit/audit.html", "audit/map.png"} <= names


@pytest.mark.slow
def test_exclude_of_the_audit_list_gives_a_split_without_them_files_untouched(audited):
    data, folder = audited["data"], audited["folder"]
    issues = read_csv(folder / "issues.csv")
    flagged = {
        row["path"]
        for row in issues
        if row["is_label_issue"] == "True" or row["is_outlier"] == "True" or row["conflict"]
    }
    assert audited["flipped"] <= flagged | {row["path"] for row in issues[:40]}
    work = audited["work"] / "excluded"
    result = run_in_process(
        "sem_cls.ingest", f"data.data_dir={data}", *DEMO, f"data.exclude={folder / 'issues.csv'}",
        tmp_path=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_csv(only((work / "logs").rglob("data/manifest.csv")))
    assert not flagged & {row["path"] for row in manifest}
    assert len(manifest) == len(issues) - len(flagged)
    report = read_csv(only((work / "logs").rglob("data/ingest_report.csv")))
    assert flagged - {row["path"] for row in report} == set()
    assert contents(data) == audited["before"]  # nothing moved, renamed, deleted or changed


def test_exclude_takes_a_list_of_paths_and_records_them(tiny_sem_dir, tmp_path):
    listed = sorted(p.relative_to(tiny_sem_dir).as_posix() for p in tiny_sem_dir.glob("*/*"))[:3]
    exclude = tmp_path / "suspects.txt"
    exclude.write_text("# left out after a look\n" + "\n".join(listed) + "\n")
    before = contents(tiny_sem_dir)
    result = run_in_process(
        "sem_cls.ingest", f"data.data_dir={tiny_sem_dir}", *DEMO, f"data.exclude={exclude}",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_csv(only((tmp_path / "logs").rglob("data/manifest.csv")))
    assert not set(listed) & {row["path"] for row in manifest}
    report = {row["path"]: row["error"] for row in
              read_csv(only((tmp_path / "logs").rglob("data/ingest_report.csv")))}  # fmt: skip
    assert all("data.exclude" in report[path] for path in listed)
    assert contents(tiny_sem_dir) == before


@pytest.mark.parametrize(
    "value, phrases",
    [
        ("{tmp}/missing.csv", ["data.exclude=", "missing.csv", "cannot be read"]),
        ("{tmp}/no_path.csv", ["no_path.csv", "no `path` column"]),
        ("[Fibres/not_there.jpg]", ["Fibres/not_there.jpg", "not in"]),
    ],
)
def test_exclude_refuses_a_list_it_cannot_use(tiny_sem_dir, tmp_path, value, phrases):
    (tmp_path / "no_path.csv").write_text("file,class\na.jpg,Fibres\n")
    result = run_in_process(
        "sem_cls.ingest", f"data.data_dir={tiny_sem_dir}", *DEMO,
        f"data.exclude={value.format(tmp=tmp_path)}", tmp_path=tmp_path,
    )  # fmt: skip
    assert_user_error(result, *phrases)


def test_audit_refuses_a_folder_without_images_or_with_one_class(tiny_sem_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / "Fibres").mkdir(parents=True)
    result = run_in_process("sem_cls.audit", f"data.data_dir={empty}", *DEMO, tmp_path=tmp_path)
    assert_user_error(result, str(empty), "no <Class>/ folders with usable images")
    one = tmp_path / "one"
    shutil.copytree(tiny_sem_dir / "Fibres", one / "Fibres")
    result = run_in_process("sem_cls.audit", f"data.data_dir={one}", *DEMO, tmp_path=tmp_path)
    assert_user_error(result, str(one), "1 class (Fibres)", "two or more class folders")


def test_audit_refuses_features_of_another_backbone(tiny_sem_dir, tmp_path):
    features = tmp_path / "inception.npy"
    np.save(features, np.zeros((80, 2048), dtype=np.float32))  # InceptionV3's width
    result = run_in_process(
        "sem_cls.audit", f"data.data_dir={tiny_sem_dir}", *DEMO, f"audit.features={features}",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert_user_error(result, "audit.features=", "2048", LITE0["backbone"], "another backbone")


# Values as the instruments wrote them: Zeiss `Image Pixel Size` 7.344 nm, `Mag` 50.00 K X,
# `EHT` 20 kV; FEI [Scan] PixelWidth 1.12413e-07 m, [Beam] HV 5000 V, magnification 1200 on its
# reference canvas (the file is named ..._1200x_...).
SCALES = {
    "Particles/1908248.tif": (7.344, 50000.0, 20.0, "Zeiss Supra 40"),
    "Biological/NiO_DC_1200x_D.tif": (112.413, 1200.0, 5.0, "Versa 3D"),
    "Biological/Ag-PvP_Bottom of Insert_DC_02052021_5KV_1000_ETD-HV_5_16.tif": (
        134.896,
        1000.0,
        5.0,
        "Versa 3D",
    ),  # fmt: skip
}


def test_scale_read_from_fei_and_zeiss_tiffs(sem_bars_dir):
    import tifffile

    from sem_cls.data.scale import read_scale

    for name, (size, magnification, voltage, instrument) in SCALES.items():
        scale = read_scale(sem_bars_dir / name)
        assert scale == dict(pixel_size_nm=size, magnification=magnification,
                             voltage_kv=voltage, instrument=instrument)  # fmt: skip
    with tifffile.TiffFile(sem_bars_dir / "Particles/1908248.tif") as tiff:
        assert tiff.sem_metadata["ap_image_pixel_size"][1:] == (7.344, "nm")
    with tifffile.TiffFile(sem_bars_dir / "Biological/NiO_DC_1200x_D.tif") as tiff:
        assert tiff.fei_metadata["Scan"]["PixelWidth"] * 1e9 == pytest.approx(112.413)
    # A TIFF without FEI or Zeiss tags, and a PNG: empty values, no error.
    for name in ("Nanowires/4.tif", "Fibres/PE 4 image.png"):
        assert set(read_scale(sem_bars_dir / name).values()) == {""}


def test_scale_in_the_manifest_and_in_predict_rows(
    sem_bars_dir, tiny_sem_dir, trained_run, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(tiny_sem_dir, data)
    shutil.copy(sem_bars_dir / "Particles/1908248.tif", data / "Particles/zeiss.tif")
    shutil.copy(sem_bars_dir / "Biological/NiO_DC_1200x_D.tif", data / "Biological/fei.tif")
    split_manifest(data).write(tmp_path / "manifest.csv")
    rows = {row["path"]: row for row in read_csv(tmp_path / "manifest.csv")}
    assert rows["Particles/zeiss.tif"]["pixel_size_nm"] == "7.344"
    assert rows["Biological/fei.tif"]["pixel_size_nm"] == "112.413"
    assert rows["Biological/fei.tif"]["voltage_kv"] == "5.0"
    assert {row["pixel_size_nm"] for path, row in rows.items() if path.endswith(".jpg")} == {""}

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(sem_bars_dir / "Particles/1908248.tif", inputs / "zeiss.tif")
    shutil.copy(sem_bars_dir / "Fibres/PE 4 image.png", inputs / "no_metadata.png")
    ckpt = next((Path(trained_run[0].paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    predicted = {
        Path(row["path"]).name: row for row in run_predict(trained_run, tmp_path, ckpt, inputs)
    }
    assert predicted["zeiss.tif"]["pixel_size_nm"] == "7.344"
    assert predicted["zeiss.tif"]["magnification"] == "50000.0"
    assert predicted["no_metadata.png"]["pixel_size_nm"] == ""
