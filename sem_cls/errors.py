"""Errors a user can fix; the entry points print them without a traceback."""

import errno
import functools
import gc
import logging
import os
import shutil
import sys
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the user's input or setup; the message says what to do."""


class DataNotFoundError(UserError):
    """The data folder is missing or holds no class folders."""


class PretrainedWeightsUnavailable(UserError):
    """Pretrained weights were asked for and cannot be loaded."""


class OutOfSpace(UserError):
    """A file could not be written for want of disk space."""

    def __init__(self, path: Path, needed_bytes: int | None, option: str):
        folder = next((p for p in [Path(path), *Path(path).parents] if p.is_dir()), Path("/"))
        free = shutil.disk_usage(folder).free
        needed = "more" if needed_bytes is None else f"about {needed_bytes / 1e6:.1f} MB"
        super().__init__(
            f"No space left for {path}: it needs {needed} and the disk of {folder} has "
            f"{free / 1e6:.1f} MB free. Free some space there, or set {option} to a folder on a "
            "disk with room."
        )


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err` is a write that failed for want of disk space (ENOSPC, or a disk quota)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


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
    if isinstance(error, OverrideParseException):
        message = (
            f"The override {error.override} is malformed ({message.splitlines()[0]}). Overrides "
            "are key=value, e.g. model.optimizer.lr=1e-3; quote values with brackets or commas: "
            "'key=[a,b]'."
        )
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


def run_command(main) -> None:
    """Run a `@hydra.main` function as the command line asks. Hydra's own refusals (a key or
    config option that does not exist, a malformed override, a value of the wrong type or not
    among the choices) and a config refused by sem_cls.config.schema.check_config while Hydra
    composes end like every user error: one message, exit code 2, before anything heavy is
    imported. Left to itself Hydra prints them and exits 1, with advice about HYDRA_FULL_ERROR;
    with HYDRA_FULL_ERROR set it raises them instead, so they can be told apart here."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        exits_on_user_error(main)()
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved
        # The process ends here, and its memory with it: the interpreter's last collections
        # need not walk what is left (torch, Lightning, MLflow: some 600,000 objects, 1.4 s).
        gc.freeze()
