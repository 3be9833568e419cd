"""Evaluate a checkpoint on the test split of a data config, and on external folders; log the
reports to MLflow.

    python eval.py ckpt_path=logs/train/runs/<time>/checkpoints/epoch_004.ckpt
    python eval.py ckpt_path=... data=synthetic        # the data the demo trained on
    python eval.py ckpt_path=... 'external=[/data/lab_b,/data/lab_c]'   # reported one by one

The results go to a new MLflow run tagged with the training run it evaluates.
"""

import logging
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

# Only Hydra at the top: a refused command line answers in a second. torch, Lightning, timm
# and MLflow are imported by evaluate(), after Hydra composed and checked the config.
import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sem_cls.errors import UserError, exits_on_user_error, run_command  # noqa: E402

log = logging.getLogger(__name__)


def external_folders(folders: list[str]) -> dict[str, Path]:
    """External `<Class>/` folders by the name their results are logged under (folder name)."""
    named = {}
    for index, folder in enumerate(map(Path, folders)):
        if not folder.is_dir():
            raise UserError(f"External folder {folder} does not exist (in external=...).")
        # Two folders of one name (a/test, b/test) are told apart by their place in the list.
        named[folder.name if folder.name not in named else f"{folder.name}_{index}"] = folder
    return named


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from sem_cls.config.predictor import check_exists
    from sem_cls.data.ingest import require_data_folder

    # A checkpoint or data folder that is not there is refused before the heavy imports.
    check_exists(cfg.ckpt_path)
    require_data_folder(cfg.data)
    import lightning as L

    from sem_cls.data.datamodule import SEMDataModule
    from sem_cls.data.ingest import ingest_folder
    from sem_cls.data.manifest import labelled_samples
    from sem_cls.evaluation.saliency import write_saliency
    from sem_cls.models.classifier import SEMClassifier
    from sem_cls.registry import is_model_uri, load_model
    from sem_cls.runner import build_datamodule, build_trainer, split_data
    from sem_cls.tracking import (
        log_artifacts,
        mark_model_training,
        mlflow_loggers,
        print_summary,
        set_tags,
    )

    L.seed_everything(cfg.seed, workers=True)
    # A .ckpt file, or an MLflow model (models:/<name>@<alias>, runs:/<run id>/model).
    tracking_uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri")
    model, checkpoint, _ = load_model(cfg.ckpt_path, tracking_uri)
    _, manifest = split_data(cfg.data)
    if manifest.class_names != model.class_names:
        raise UserError(
            f"The checkpoint knows classes {model.class_names}, but {manifest.root} holds "
            f"{manifest.class_names}. Evaluate on data with the same class folders."
        )
    trained_split = checkpoint.get(SEMDataModule.__qualname__, {}).get("split_fingerprint")
    if trained_split and trained_split != manifest.fingerprint():
        log.warning(
            "This split differs from the one the checkpoint was trained with (other data or "
            "seed): test images may have been seen in training."
        )
    # External folders are checked before anything runs, so a wrong one costs no evaluation.
    externals = {
        f"external/{name}": labelled_samples(
            ingest_folder(cfg.data, folder), model.class_names, cfg.data.info_bar
        )
        for name, folder in external_folders(cfg.get("external") or []).items()
    }
    for name, samples in externals.items():
        seen = {row["sha256"] for row in manifest.rows} & {s.sha256 for s in samples}
        if seen:
            log.warning("%d images of %s are also in %s.", len(seen), name, manifest.root)
    tta = bool(cfg.get("tta"))
    # One test pass per named set: "test", then "external/<name>" for each folder.
    datamodule = build_datamodule(manifest, cfg.data, model, tta, test_sets=externals)
    classifier = SEMClassifier(model, tta=tta)
    trainer = build_trainer(cfg)
    source = cfg.ckpt_path if is_model_uri(cfg.ckpt_path) else str(Path(cfg.ckpt_path).resolve())
    tags = {"ckpt_path": source, "data_dir": str(manifest.root)}
    if "mlflow_run_id" in checkpoint:
        tags["evaluated_run_id"] = checkpoint["mlflow_run_id"]
    set_tags(trainer.loggers, tags)
    for logger in mlflow_loggers(trainer.loggers):
        mark_model_training(logger)
    trainer.test(classifier, datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if OmegaConf.select(cfg, "saliency.images") and trainer.is_global_zero:  # once, not per rank
        saliency = write_saliency(
            Path(cfg.paths.output_dir) / "reports" / "test" / "saliency.png",
            model,
            datamodule,
            datamodule.samples["test"],
            cfg.saliency.images,
            f"test: {cfg.ckpt_path}",
        )
        log_artifacts(trainer.loggers, [saliency], "reports/test")
    print_summary(trainer.loggers, metrics, cfg)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)  # Hydra composed cfg and checked it (sem_cls.config.schema.ConfigCheck)


if __name__ == "__main__":
    run_command(main)
