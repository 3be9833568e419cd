"""Every private API of Lightning, MLflow, Hydra's Optuna sweeper and Optuna that the project
uses, in one place, each with a test against the pinned version (tests/test_compat.py): an
upgrade that removes or changes one fails there, by name, not in a user's run. Imports
nothing at the top, so the Hydra plugins may use it while Hydra starts."""

from contextlib import contextmanager


def reruns_command_line(strategy) -> bool:
    """Whether Lightning starts the strategy's further ranks by running the command line again
    (`ddp` with several devices, started locally, not by SLURM or torchrun). Lightning says so
    only through the class of its launcher."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(strategy, "launcher", None)
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
    )


@contextmanager
def mlflow_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI (and the registry URI that follows it unless one is
    set) pointed at `uri` for the call, then put back exactly as it was: an unset URI stays
    unset, which `mlflow.set_tracking_uri` cannot do."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def _require(owner, name: str) -> None:
    # Assigning a method that no longer exists would add an attribute nothing calls: say so.
    if not callable(getattr(owner, name, None)):
        raise RuntimeError(
            f"{owner!r} has no method {name}: the installed version is not the one pinned in "
            "requirements.txt, which sem_cls/compat.py patches."
        )


def commit_optuna_schema_stamp() -> None:
    """optuna 2.10 stamps a new database's schema version on a connection it never commits,
    which SQLAlchemy 1's autocommit used to save; under SQLAlchemy 2 the stamp is rolled back
    and the storage then refuses its own database. Makes it the same stamp, committed."""
    import alembic.migration
    from optuna.storages._rdb.storage import _VersionManager

    _require(_VersionManager, "_set_alembic_revision")
    _require(_VersionManager, "_create_alembic_script")

    def set_alembic_revision(self, revision: str) -> None:
        with self.engine.begin() as connection:
            context = alembic.migration.MigrationContext.configure(connection)
            context.stamp(self._create_alembic_script(), revision)

    _VersionManager._set_alembic_revision = set_alembic_revision


def rewrite_trial_overrides(sweeper_impl, rewrite) -> None:
    """Hydra's Optuna sweeper turns a batch of trials into one list of overrides per trial
    (`_configure_trials`); `rewrite(trials, overrides)` then changes those lists."""
    _require(sweeper_impl, "_configure_trials")
    configure = sweeper_impl._configure_trials

    def rewritten(trials, *args):
        return rewrite(trials, configure(trials, *args))

    sweeper_impl._configure_trials = rewritten
