"""Classify new SEM images with a trained model (sem_cls.predictor.Predictor), preprocessed
exactly as training preprocessed them, into one CSV.

python -m sem_cls.predict ckpt_path=logs/train/runs/<time>/checkpoints/epoch_004.ckpt \
    inputs=/data/new_images output=predictions.csv
python -m sem_cls.predict ckpt_path=models:/sem-cls@champion 'inputs=[a.tif,b.png]' \
    top_k=5 min_confidence=0.6

One CSV row per image file (folders are walked recursively): the top-k classes with their
probabilities, `uncertain` below min_confidence, `unknown` unlike the training images, or the
reason a file could not be read. Settings are checked before torch is imported, so a bad value
answers at once.
"""

import csv
import logging
import os
from collections import Counter
from pathlib import Path

from sem_cls.config.predictor import PredictorSettings, check_exists
from sem_cls.errors import UserError, exits_on_user_error, run_command

log = logging.getLogger(__name__)

# The first columns of every predictions CSV: how check_output knows one it may replace.
PREDICTIONS_HEADER = "path,predicted_class,confidence"


def image_files(inputs) -> list[Path]:
    """Image files of `inputs` (collect_inputs)."""
    return collect_inputs(inputs)[0]


def collect_inputs(inputs) -> tuple[list[Path], list[Path]]:
    """Image files of `inputs`, and the files of its folders left out as no image by their
    suffix. Folders are walked as ingest walks them (recursively, following links; a symlink
    loop is listed, to be reported); files named one by one are taken whatever their suffix (a
    bad one is reported, not skipped)."""
    from sem_cls.data.images import is_image_file, walk_files

    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    files, left_out = [], []
    for item in map(Path, items):
        if item.is_dir():
            for path, error in walk_files(item):
                (files if error or is_image_file(path) else left_out).append(path)
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"inputs: {item} is neither a folder nor a file.")
    if not files:
        raise UserError(f"inputs={items} holds no image files (.jpg .png .tif .bmp).")
    return files, left_out


def predictions_table(rows: list[dict], top_k: int) -> list[list]:
    """Header and rows of the CSV: path, predicted_class, confidence, novelty, top<i>_class and
    top<i>_prob for i <= top_k, the scale (pixel_size_nm, magnification, voltage_kv,
    instrument), error. Empty cells where there is no value (not scored, unread)."""
    from sem_cls.data.scale import SCALE_FIELDS  # tifffile: not before the options are checked

    header = [*PREDICTIONS_HEADER.split(","), "novelty"]
    for rank in range(1, top_k + 1):
        header += [f"top{rank}_class", f"top{rank}_prob"]
    table = [[*header, *SCALE_FIELDS, "error"]]
    for row in rows:
        scale = [row.get(key, "") for key in SCALE_FIELDS]  # from TIFF metadata, or empty
        if row["error"]:
            table.append([row["path"], "", "", "", *[""] * (2 * top_k), *scale, row["error"]])
            continue
        ranked = [item for name, p in row["top_k"] for item in (name, f"{p:.6f}")]
        novelty = "" if row["novelty"] is None else f"{row['novelty']:.6f}"
        confidence = f"{row['confidence']:.6f}"
        table.append(
            [row["path"], row["predicted_class"], confidence, novelty, *ranked, *scale, ""]
        )
    return table


def write_predictions(path: Path, rows: list[dict], top_k: int) -> Path:
    """The CSV written whole or not at all: into a temporary file beside `path`, then renamed
    over it, so a reader (or a killed run) never sees half a file."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", newline="") as f:
            csv.writer(f).writerows(predictions_table(rows, top_k))
        umask = os.umask(0)  # mkstemp makes the file private; the CSV gets the usual mode
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def check_output(path: Path) -> None:
    """An existing `path` may be replaced only when it is an earlier predictions CSV."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        with path.open(newline="") as f:
            ours = path.is_file() and f.readline().startswith(PREDICTIONS_HEADER)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise UserError(
            f"output={path} exists and is not a predictions file of an earlier run; it is left "
            "as it is. Give another output=... path."
        )


def output_lock(path: Path):
    """A lock on `path` held for the whole run: a second run writing the same file at the same
    time refuses instead of both reporting success while one result set is lost. The lock file
    (.<name>.lock beside it) stays: removing it would let two runs lock two different files."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.parent / f".{path.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"output={path} is being written by another predict run right now. Wait for it to "
            "finish, or give another output=... path."
        ) from None
    return lock


def summary(rows: list[dict], left_out: list[Path]) -> str:
    """What the run did, in a few lines: nothing vanishes without a count and a reason."""
    from sem_cls.predictor import UNCERTAIN, UNKNOWN

    decisions = Counter(row["predicted_class"] for row in rows)
    unreadable = sum(bool(row["error"]) for row in rows)
    lines = [
        f"{len(rows)} images: {len(rows) - unreadable} classified ({decisions[UNKNOWN]} unknown, "
        f"{decisions[UNCERTAIN]} uncertain), {unreadable} unreadable (see the error column)"
    ]
    if left_out:
        suffixes = Counter(path.suffix.lower() or "no suffix" for path in left_out)
        kinds = ", ".join(f"{count} {suffix}" for suffix, count in sorted(suffixes.items()))
        lines.append(
            f"{len(left_out)} files in the input folders left out, not image files by their "
            f"suffix ({kinds}); name one in inputs=[...] to have it tried and reported"
        )
    return "\n".join(lines)


def predict(cfg) -> Path:
    """Classify every image of `cfg.inputs` with the model of `cfg.ckpt_path`; write cfg.output."""
    settings = PredictorSettings.from_config(cfg)  # before anything heavy is imported
    output = Path(cfg.output)
    files, left_out = collect_inputs(cfg.inputs)
    lock = output_lock(output)
    try:
        check_output(output)  # before the work, so a refusal costs nothing
        check_exists(cfg.ckpt_path)
        from sem_cls.predictor import Predictor

        predictor = Predictor.load(
            cfg.ckpt_path,
            settings,
            tracking_uri=cfg.get("tracking_uri"),
            cache_dir=cfg.paths.engine_dir,
        )
        rows = predictor.predict(files, progress=True)
        write_predictions(output, rows, settings.top_k)
    finally:
        lock.release()
    print(f"{summary(rows, left_out)}\nPredictions: {output}")
    for row in [row for row in rows if row["error"]][:20]:
        log.warning("Unreadable %s: %s", row["path"], row["error"])
    for path in left_out[:20]:
        log.warning("Left out (not an image file by its suffix): %s", path)
    return output


def main() -> None:
    # Hydra only for the command line.
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
    @exits_on_user_error
    def run(cfg) -> None:
        predict(cfg)

    run_command(run)  # one composition; Hydra's refusals end with exit code 2


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main()
