"""Resuming and reproducing runs: a killed run continues where its last checkpoint left it.

`python train.py resume=<run folder or MLflow run id>` continues a run with its saved config,
in the same output folder and the same MLflow run; `reproduce=` starts a new run with a saved
config. Checkpoints are written atomically and carry the random generators' states, so a
resumed run on CPU ends where an uninterrupted one would.
"""

import logging
import os
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from sem_cls.errors import OutOfSpace, UserError, is_out_of_space
from sem_cls.tracking import (
    ContinuingMLFlowLogger,  # noqa: F401 -- named by saved run configs
    find_run,
)

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a temporary name beside it, then renames it into place: a
    kill mid-write leaves the previous checkpoint whole, never a truncated one.

    Lightning's own save is atomic only when TMPDIR is on the checkpoint's filesystem: fsspec
    writes to a file in TMPDIR and `shutil.move`s it, which across filesystems copies into the
    existing last.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        except OSError as err:
            if is_out_of_space(err):  # the log folder's disk (or TMPDIR's, see above) is full
                needed = sum(t.nbytes for t in _tensors(checkpoint))
                raise OutOfSpace(path, needed, "paths.log_dir") from None
            raise
        finally:
            partial.unlink(missing_ok=True)


def _tensors(value):
    """Every tensor in a checkpoint's nested dicts, lists and tuples: about its size on disk."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


class RandomState(Callback):
    """Keeps torch's, numpy's and Python's generator states in every checkpoint and restores
    them on resume, so the epochs after a resume shuffle as they would have without the kill."""

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            # Tensors and plain values only: checkpoints load with weights_only=True.
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def saved_run_dir(reference: str, tracking_uri: str | None, option: str) -> Path:
    """The output folder of a run, given the folder itself or the run's MLflow id."""
    path = Path(reference)
    if path.is_dir():
        if not (path / ".hydra" / "config.yaml").is_file():
            raise UserError(
                f"{option}={reference} holds no .hydra/config.yaml. Give a run's output folder "
                "(logs/<task>/runs/<time>) or its MLflow run id."
            )
        return path
    run = find_run(reference, tracking_uri) if tracking_uri else None
    if run is None or "paths/output_dir" not in run.data.params:
        raise UserError(
            f"{option}={reference} is neither a run's output folder nor the id of a training run "
            f"in {tracking_uri}. The folder is printed at the end of every run; the id is in "
            "the MLflow UI."
        )
    return saved_run_dir(run.data.params["paths/output_dir"], None, option)


def saved_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path | None]:
    """The config to run, and the run folder to continue: `cfg` itself and None, unless `cfg`
    says resume= or reproduce=.

    The saved config is used as it was; `key=value` overrides the run was not started with
    apply on top (e.g. trainer.max_epochs=20 to train longer). Choosing other config-group
    options (model=...) would make another run, so that is refused.
    """
    option = "resume" if cfg.get("resume") else "reproduce" if cfg.get("reproduce") else None
    if option is None:
        return cfg, None
    if cfg.get("resume") and cfg.get("reproduce"):
        raise UserError("Give resume= or reproduce=, not both.")
    uri = OmegaConf.select(cfg, "logger.mlflow.tracking_uri")
    run_dir = saved_run_dir(str(cfg[option]), uri, option)
    saved_overrides = run_dir / ".hydra" / "overrides.yaml"
    # The run's own command line may be repeated with resume= added; only what differs counts.
    given_before = set(OmegaConf.load(saved_overrides)) if saved_overrides.is_file() else set()
    extra = [
        o
        for o in overrides
        if not o.startswith(("resume=", "reproduce=", "hydra.")) and o not in given_before
    ]
    groups = [o for o in extra if "." not in o.split("=", 1)[0].lstrip("+~")]
    if groups:
        raise UserError(
            f"{option}= runs the saved config; {', '.join(groups)} would choose other config "
            "groups. Start a new run for that, or override single values (key.sub=value)."
        )
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    OmegaConf.set_struct(saved, False)
    saved.merge_with_dotlist(extra)
    saved.resume, saved.reproduce = None, None
    if option == "resume":
        saved.paths.output_dir = str(run_dir.resolve())
        run_id_file = run_dir / RUN_ID_FILE
        if OmegaConf.select(saved, "logger.mlflow") is not None and run_id_file.is_file():
            saved.logger.mlflow.run_id = run_id_file.read_text().strip()
    else:
        saved.paths.output_dir = cfg.paths.output_dir  # a new folder for the new run
    log.info("%s of the run in %s", option.capitalize(), run_dir)
    return saved, run_dir if option == "resume" else None


def last_checkpoint(run_dir: Path) -> Path | None:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    return checkpoint if checkpoint.is_file() else None


def resume_hydra_overrides(config_dir: Path, config_name: str, overrides: list[str]) -> list[str]:
    """Hydra overrides that put a resumed run's Hydra record and log into the run's own folder:
    the log appended to `<task_name>.log`, this command line's config and overrides in
    `.hydra/resumed_<time>/`, the run's original `.hydra/` left as it was. Empty without
    resume=. Hydra chooses its output folder before train.py runs, hence the overrides."""
    from hydra import compose, initialize_config_dir

    if not any(o.startswith("resume=") for o in overrides):
        return []
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    if not cfg.get("resume"):
        return []
    run_dir = saved_run_dir(
        str(cfg.resume), OmegaConf.select(cfg, "logger.mlflow.tracking_uri"), "resume"
    ).resolve()
    task_name = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("task_name", "train")

    def quoted(path: Path) -> str:  # a path with commas or spaces is one override value
        return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"

    return [
        f"hydra.run.dir={quoted(run_dir)}",
        f"hydra.output_subdir=.hydra/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}",
        f"hydra.job_logging.handlers.file.filename={quoted(run_dir / f'{task_name}.log')}",
    ]
