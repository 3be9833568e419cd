"""Tests for the built-in SEM-like dataset: layout, determinism, reuse and the info bar."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from sem_cls.data import synthetic
from sem_cls.data.synthetic import CLASSES, generate_dataset, info_bar_kind, render_image
from sem_cls.errors import UserError
from tests.helpers import assert_user_error
from tests.helpers import run_entry_point as run_script

SIZE = (256, 192)
BAR_HEIGHT = round(synthetic.INFO_BAR_HEIGHT_AT_768 * SIZE[1] / 768)
NAME = re.compile(r"^L\d+_[0-9a-f]{32}\.jpg$")


def _images(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.glob("*/*.jpg"))}


def _pixels(root):
    return {name: np.asarray(Image.open(path)) for name, path in _images(root).items()}


def _manifest(root):
    return json.loads((root / synthetic.MARKER_NAME).read_text())


def _extreme_share(rows: np.ndarray) -> tuple[float, float]:
    """Shares of near-black and near-white pixels: a bar's flat background is one of them."""
    return float((rows <= 8).mean()), float((rows >= 247).mean())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    return generate_dataset(root, images_per_class=3, seed=0, size=SIZE, workers=1)


def test_layout_matches_nffa(small_set):
    assert sorted(p.name for p in small_set.iterdir() if p.is_dir()) == sorted(CLASSES)
    assert CLASSES[0] == "Biological" and len(CLASSES) == 10
    for class_name in CLASSES:
        files = sorted((small_set / class_name).iterdir())
        assert len(files) == 3
        for path in files:
            assert NAME.match(path.name), path.name
            with Image.open(path) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == SIZE


def test_grayscale_stored_as_rgb(small_set):
    for name, pixels in _pixels(small_set).items():
        spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
        assert spread.max() <= 3, name
        assert pixels[..., 0].std() > 5, f"{name} is flat"


def test_same_seed_same_images_different_seed_different(small_set, tmp_path):
    again = generate_dataset(tmp_path / "again", 3, seed=0, size=SIZE, workers=1)
    other = generate_dataset(tmp_path / "other", 3, seed=1, size=SIZE, workers=1)
    first, second, third = _pixels(small_set), _pixels(again), _pixels(other)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert first.keys().isdisjoint(third.keys())  # names come from the seed too
    for class_name in CLASSES:
        ours = [v for k, v in first.items() if k.startswith(class_name + "/")]
        theirs = [v for k, v in third.items() if k.startswith(class_name + "/")]
        assert not any(np.array_equal(a, b) for a in ours for b in theirs)


def test_worker_count_does_not_change_images(small_set, tmp_path):
    parallel = generate_dataset(tmp_path / "parallel", 3, seed=0, size=SIZE, workers=2)
    serial, spread = _images(small_set), _images(parallel)
    assert serial.keys() == spread.keys()
    assert all(serial[k].read_bytes() == spread[k].read_bytes() for k in serial)


def test_render_image_is_a_function_of_the_rng():
    a = render_image("Tips", np.random.default_rng([3, 9, 1]), size=SIZE, info_bar="dark")
    b = render_image("Tips", np.random.default_rng([3, 9, 1]), size=SIZE, info_bar="dark")
    c = render_image("Tips", np.random.default_rng([3, 9, 2]), size=SIZE, info_bar="dark")
    assert a.size == SIZE and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_second_call_reuses_the_set(tmp_path):
    root = generate_dataset(tmp_path / "set", 2, seed=0, size=SIZE, workers=1)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_dataset(root, 2, seed=0, size=SIZE, workers=2) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_changed_parameters_regenerate(tmp_path):
    root = generate_dataset(tmp_path / "set", 2, seed=0, info_bar_share=0.0, size=SIZE, workers=1)
    before = _pixels(root)
    generate_dataset(root, 3, seed=0, info_bar_share=1.0, size=SIZE, workers=1)
    after = _pixels(root)
    assert _manifest(root)["params"]["info_bar_share"] == 1.0
    assert len(after) == 30 and before.keys() < after.keys()
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # bars added


def test_incomplete_set_is_rebuilt(tmp_path):
    root = generate_dataset(tmp_path / "set", 2, seed=0, size=SIZE, workers=1)
    missing = next(iter(_images(root).values()))
    missing.unlink()
    generate_dataset(root, 2, seed=0, size=SIZE, workers=1)
    assert missing.is_file() and len(_images(root)) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_refuses_to_overwrite_foreign_files(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=re.escape(str(root))):
        generate_dataset(root, 1, size=SIZE, workers=1)
    assert (root / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_users_folders_with_class_names_are_left_alone(tmp_path):
    root = tmp_path / "mine"
    for class_name in CLASSES:
        (root / class_name).mkdir(parents=True)
        (root / class_name / "IMG_0001.jpg").write_bytes(
            b"my own micrograph " + class_name.encode()
        )
    before = _snapshot(root)
    with pytest.raises(UserError, match="Biological.*no marker file"):
        generate_dataset(root, 1, size=SIZE, workers=1)
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_file_added_to_a_generated_set_stops_regeneration(tmp_path):
    root = generate_dataset(tmp_path / "set", 1, seed=0, size=SIZE, workers=1)
    mine = root / "Tips" / "my_tip.jpg"
    mine.write_bytes(b"a user's own image")
    before = _snapshot(root)
    with pytest.raises(UserError, match="Tips/my_tip.jpg"):
        generate_dataset(root, 2, seed=0, size=SIZE, workers=1)  # new parameters: rebuild
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_set_without_its_marker_is_not_taken_for_generated(tmp_path):
    root = generate_dataset(tmp_path / "set", 1, seed=0, size=SIZE, workers=1)
    (root / synthetic.MARKER_NAME).unlink()  # sets only move in complete, marker and all
    before = _snapshot(root)
    with pytest.raises(UserError):
        generate_dataset(root, 1, seed=0, size=SIZE, workers=1)
    assert _snapshot(root) == before


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "set").mkdir()
    root = generate_dataset(tmp_path / "set", 1, seed=0, size=SIZE, workers=1)
    assert len(_images(root)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_folder_named_like_the_staging_area_is_kept(tmp_path):
    lookalike = tmp_path / f".set.partial-{os.getpid()}"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("keep")
    generate_dataset(tmp_path / "set", 1, seed=0, size=SIZE, workers=1)
    assert (lookalike / "keep.txt").read_text() == "keep"


@pytest.mark.slow  # a train.py process: imports alone take 10-50 s on a busy machine
def test_train_refuses_a_users_folder_with_class_names(tmp_path):
    """`python train.py experiment=demo data.data_dir=<my images>` must not replace them."""
    root = tmp_path / "my_images"
    for class_name in CLASSES:
        (root / class_name).mkdir(parents=True)
        (root / class_name / "scan_01.jpg").write_bytes(b"user bytes " + class_name.encode())
    before = _snapshot(root)
    result = run_script(
        "train.py",
        "experiment=demo",
        f"data.data_dir={root}",
        "data.num_workers=0",
        tmp_path=tmp_path,
    )
    assert_user_error(result, str(root), "data.synthetic=null", "data.data_dir")
    assert _snapshot(root) == before
    assert {p.relative_to(root).as_posix() for p in root.rglob("*")} == {
        *CLASSES,
        *(f"{c}/scan_01.jpg" for c in CLASSES),
    }
    assert result.stderr.count("did not write") == 1  # one message, not one per layer


def test_info_bar_share_and_kinds():
    kinds = [info_bar_kind(0, i, 0.6) for i in range(4000)]
    with_bar = [k for k in kinds if k is not None]
    assert len(with_bar) / len(kinds) == pytest.approx(0.6, abs=0.03)
    assert with_bar.count("dark") / len(with_bar) == pytest.approx(0.2, abs=0.03)
    assert set(with_bar) == {"bright", "dark"}
    assert all(info_bar_kind(0, i, 0.0) is None for i in range(200))
    assert all(info_bar_kind(0, i, 1.0) is not None for i in range(200))
    assert kinds != [info_bar_kind(1, i, 0.6) for i in range(4000)]


def test_bars_sit_at_the_bottom_and_do_not_depend_on_class(tmp_path):
    root = generate_dataset(tmp_path / "set", 8, seed=2, info_bar_share=0.5, size=SIZE, workers=1)
    files = _manifest(root)["files"]
    patterns = []
    for class_name in CLASSES:
        entries = files[class_name]
        patterns.append([e["info_bar"] for e in entries])
        assert {e["info_bar"] is None for e in entries} == {True, False}, class_name
        for entry in entries:
            gray = np.asarray(Image.open(root / class_name / entry["name"]).convert("L"))
            dark, bright = _extreme_share(gray[-BAR_HEIGHT:])
            above = max(_extreme_share(gray[-2 * BAR_HEIGHT : -BAR_HEIGHT]))
            assert above < 0.4, entry
            if entry["info_bar"] is None:
                assert max(dark, bright) < 0.4, entry
            else:
                flat = bright if entry["info_bar"] == "bright" else dark
                assert flat > 0.6, entry
                # the bar starts exactly BAR_HEIGHT rows above the bottom
                first_row = max(_extreme_share(gray[-BAR_HEIGHT]))
                last_content_row = max(_extreme_share(gray[-BAR_HEIGHT - 1]))
                assert first_row > 0.6 and last_content_row < 0.4, entry
    assert all(p == patterns[0] for p in patterns)  # the same bars in every class


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown class"):
        render_image("Cats", np.random.default_rng(0), size=SIZE)
    with pytest.raises(ValueError, match="info_bar"):
        render_image("Tips", np.random.default_rng(0), size=SIZE, info_bar="grey")
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", 0, size=SIZE)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", 1, info_bar_share=1.5, size=SIZE)


def test_cli_writes_and_reports(tmp_path, capsys):
    root = tmp_path / "cli"
    synthetic.main(
        [
            "--root",
            str(root),
            "--images-per-class",
            "1",
            "--seed",
            "4",
            "--info-bar-share",
            "0",
            "--width",
            "128",
            "--height",
            "96",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert str(root) in out and "10 images" in out
    assert len(_images(root)) == 10
    assert _manifest(root)["params"]["seed"] == 4


def test_cli_refuses_a_foreign_root_with_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as stop:
        synthetic.main(["--root", str(tmp_path), "--images-per-class", "1", "--workers", "1"])
    assert stop.value.code == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_marker_cannot_point_the_clean_up_outside_its_folder(tmp_path):
    root = generate_dataset(tmp_path / "set", 1, seed=0, size=SIZE, workers=1)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    marker = _manifest(root)
    marker["files"]["Tips"].append({"name": "../../../outside.txt", "info_bar": None})
    (root / synthetic.MARKER_NAME).write_text(json.dumps(marker))
    generate_dataset(root, 2, seed=0, size=SIZE, workers=1)  # replaces the old set
    assert outside.read_text() == "keep"
    assert len(_images(root)) == 20
