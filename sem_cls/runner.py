"""Shared by the entry points: objects from config, user errors, the closing summary."""

import functools
import logging
import sys
from pathlib import Path

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sem_cls.errors import UserError
from sem_cls.tracking import mlflow_loggers

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list:
    """Objects of every entry with a `_target_` in a config group such as callbacks or logger."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def build_trainer(cfg: DictConfig):
    """The Lightning Trainer of `cfg.trainer` with the configured callbacks and loggers."""
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    _refuse_rerun_of_a_local_sweep(trainer)
    return trainer


def _refuse_rerun_of_a_local_sweep(trainer) -> None:
    """Lightning's `ddp` starts ranks 1.. by running the command line again, with Hydra's run
    dir set to rank 0's; in a multirun (-m) that command line is the whole sweep, which every
    rank would start over in folders of its own. SLURM or torchrun starting the ranks is fine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        raise UserError(
            "trainer.strategy=ddp cannot run inside a local sweep (-m): Lightning would start "
            "the whole sweep again for every further device. Add trainer.strategy=ddp_spawn, "
            "run the trials one by one, or sweep with hydra/launcher=slurm, where SLURM starts "
            "each rank."
        )


# Hydra's own "the command line names no such key, option or config": user errors too.
CONFIG_ERRORS = (UserError, ConfigCompositionException, OverrideParseException)


def _user_error_in(err: BaseException | None) -> Exception | None:
    """The user error behind `err`; hydra.utils.instantiate wraps what a constructor raises."""
    while err is not None and not isinstance(err, CONFIG_ERRORS):
        err = err.__cause__
    return err


def _message(error: Exception) -> str:
    message = str(error)
    if isinstance(error, MissingConfigException):
        # Hydra lists its whole config search path after the options; the options suffice.
        message = message.split("\nConfig search path", 1)[0]
    if not isinstance(error, UserError) and error.__cause__ is not None:
        message += "\n" + str(error.__cause__).splitlines()[0]  # e.g. "Key 'x' is not in struct"
    return message.strip()


def exits_on_user_error(task):
    """A user error ends the program with its message and exit code 2, not a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as err:
            user_error = _user_error_in(err)
            if user_error is None:
                raise
            log.debug("User error", exc_info=True)
            print(f"\nError: {_message(user_error)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@exits_on_user_error
def check_command_line(config_dir: Path, config_name: str) -> None:
    """Compose the config of this command line once before `@hydra.main` does: an override of
    no such key, an unknown config option or a malformed override then ends with exit code 2
    and one message (Hydra itself exits 1 with advice about HYDRA_FULL_ERROR). Hydra's own
    answers (--help, --info, ...) are left to it; in a sweep (-m) the first value of every
    swept list is checked."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args()
    elsewhere = args.config_path or args.config_name or args.config_dir
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return
    if elsewhere or args.experimental_rerun:
        return  # another config than `config_name`: Hydra composes and checks it
    overrides = args.overrides
    if args.multirun:
        overrides = []
        for override in OverridesParser.create().parse_overrides(args.overrides):
            if not override.is_sweep_override():
                overrides.append(override.input_line)
            elif override.is_discrete_sweep():
                first = next(iter(override.sweep_string_iterator()))
                overrides.append(f"{override.get_key_element()}={first}")
            # an interval(...) is the sweeper's to sample: its key is not checked here
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        compose(config_name=config_name, overrides=overrides)


@rank_zero_only  # once per run, not once per DDP rank
def print_summary(loggers, metrics: dict, cfg: DictConfig) -> None:
    """Where the run is, its main figures, and how to look at it in the MLflow UI."""
    lines = [f"{name} = {float(value):.4f}" for name, value in sorted(metrics.items())]
    for logger in mlflow_loggers(loggers):
        uri = logger._tracking_uri
        ui = "  open the UI with `make ui`, then http://127.0.0.1:5000"
        if str(uri).startswith(("http://", "https://")):
            ui = f"  open the UI at {uri}"  # a tracking server is its own UI
        lines += [
            f"MLflow run {logger.run_id} in experiment '{logger._experiment_name}'",
            f"  tracking URI: {uri}",
            ui,
        ]
    lines.append(f"Output folder: {cfg.paths.output_dir}")
    print("\n" + "\n".join(lines))
