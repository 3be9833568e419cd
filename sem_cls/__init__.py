"""sem-cls: train, evaluate and apply classifiers for scanning-electron-microscope images."""

import os
from datetime import datetime

from omegaconf import OmegaConf

# `${run_stamp:}` names a run's output folder (conf/hydra/default.yaml): the time to the
# microsecond and the process id, so runs started in the same second get folders of their own.
# Registered here, on import of the package, because every entry point imports it before
# Hydra composes its config; cached per config like Hydra's `now`, so a run, its sweep jobs and
# Lightning's further DDP ranks (given rank 0's folder) see one value.
OmegaConf.register_new_resolver(
    "run_stamp",
    lambda: f"{datetime.now():%Y-%m-%d_%H-%M-%S_%f}_{os.getpid()}",
    use_cache=True,
    replace=True,
)
