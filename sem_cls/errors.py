"""Errors a user can fix; the entry points print them without a traceback."""

import functools
import logging
import sys

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the user's input or setup; the message says what to do."""


class DataNotFoundError(UserError):
    """The data folder is missing or holds no class folders."""


class PretrainedWeightsUnavailable(UserError):
    """Pretrained weights were asked for and cannot be loaded."""


def _user_error_in(err: BaseException | None) -> UserError | None:
    """The UserError behind `err`; hydra.utils.instantiate wraps what a constructor raises."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


def exits_on_user_error(task):
    """A UserError ends the program with its message and exit code 2, not a traceback."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except Exception as err:
            user_error = _user_error_in(err)
            if user_error is None:
                raise
            log.debug("User error", exc_info=True)
            print(f"\nError: {user_error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
