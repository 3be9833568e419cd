"""Errors a user can fix; the entry points print them without a traceback."""


class UserError(Exception):
    """A problem with the user's input or setup; the message says what to do."""


class DataNotFoundError(UserError):
    """The data folder is missing or holds no class folders."""


class PretrainedWeightsUnavailable(UserError):
    """Pretrained weights were asked for and cannot be loaded."""
