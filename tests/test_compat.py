"""The private APIs behind sem_cls/compat.py, against the pinned Lightning, MLflow, Hydra
Optuna sweeper and Optuna: an upgrade that removes or changes one fails here, by name."""

import os
import subprocess
import sys

import lightning as L
import mlflow
import pytest

from sem_cls.compat import (
    commit_optuna_schema_stamp,
    mlflow_tracking_uri,
    reruns_command_line,
    rewrite_trial_overrides,
)
from tests.helpers import ROOT


def cpu_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)


def test_lightning_tells_which_strategy_runs_the_command_line_again():
    assert reruns_command_line(cpu_trainer(devices=2, strategy="ddp").strategy)
    assert not reruns_command_line(cpu_trainer(devices=2, strategy="ddp_spawn").strategy)
    assert not reruns_command_line(cpu_trainer(devices=1).strategy)


def test_mlflow_tracking_uri_is_put_back_as_it_was(tmp_path):
    before, inside = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    with mlflow_tracking_uri(before):
        with mlflow_tracking_uri(inside):
            assert mlflow.get_tracking_uri() == inside
        assert mlflow.get_tracking_uri() == before


def test_mlflow_tracking_uri_leaves_an_unset_uri_unset(tmp_path):
    # Unset, MLflow reads MLFLOW_TRACKING_URI when asked: the URI set for the call must not stick.
    later = f"sqlite:///{tmp_path / 'later.db'}"
    code = (
        "import os, mlflow\n"
        "from sem_cls.compat import mlflow_tracking_uri\n"
        f"with mlflow_tracking_uri('sqlite:///{tmp_path / 'call.db'}'):\n"
        "    pass\n"
        f"os.environ['MLFLOW_TRACKING_URI'] = '{later}'\n"
        "print(mlflow.get_tracking_uri())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == later


def test_optuna_reopens_the_sqlite_study_it_created(tmp_path):
    import optuna

    commit_optuna_schema_stamp()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="search", storage=storage).optimize(lambda t: 1.0, n_trials=1)
    # A second storage on the file checks the schema stamp the first one left.
    study = optuna.load_study(study_name="search", storage=storage)
    assert len(study.trials) == 1


def test_the_optuna_sweeper_overrides_of_a_trial_can_be_rewritten():
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    impl = OptunaSweeperImpl(None, "maximize", None, None, 1, 1, 0.0, None, None, None)
    rewrite_trial_overrides(impl, lambda trials, overrides: [[*o, "extra=1"] for o in overrides])
    trial = optuna.create_study().ask()
    space = {"lr": optuna.distributions.UniformDistribution(0.1, 0.2)}
    [overrides] = impl._configure_trials([trial], space, {"epochs": 3})
    assert overrides == [f"lr={trial.params['lr']}", "epochs=3", "extra=1"]


def test_a_patch_of_a_method_that_is_gone_fails_loudly():
    with pytest.raises(RuntimeError, match="_configure_trials"):
        rewrite_trial_overrides(object(), lambda trials, overrides: overrides)
