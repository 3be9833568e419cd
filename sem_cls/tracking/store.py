"""The MLflow tracking store and its experiments, set up safely by processes started together
(one lock per store)."""

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig

from sem_cls.errors import UserError

STORE_LOCK_TIMEOUT_S = 300  # creating a store takes seconds; a longer wait is a hung process


def is_tracking_server(tracking_uri: str) -> bool:
    return str(tracking_uri).startswith(("http://", "https://"))


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a SQLite store; None for other stores and an in-memory one."""
    if not str(tracking_uri).startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(str(tracking_uri)).database
    return Path(database) if database and database != ":memory:" else None


def store_lock_file(tracking_uri: str) -> Path | None:
    """The lock file guarding the first use of a tracking store: beside a SQLite database, in
    the temp folder for other local stores and databases; None for a tracking server (it
    serializes its own set-up) and for an in-memory store."""
    uri = str(tracking_uri)
    if is_tracking_server(uri):
        return None
    if uri.startswith("sqlite:"):
        database = sqlite_database(uri)
        return database.resolve().with_name(database.name + ".lock") if database else None
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sem-cls-mlflow-{digest}.lock"


def store_not_created(tracking_uri: str) -> bool:
    """Whether `tracking_uri` is a SQLite store whose database file does not exist yet: it
    holds no run, and opening it would create it."""
    database = sqlite_database(tracking_uri)
    return database is not None and not database.is_file()


@contextmanager
def store_lock(tracking_uri: str):
    """Held while a process first opens a tracking store and creates its experiment: processes
    started together would each set up a new SQLite database (MLflow's schema migration then
    fails in all but one: 'Online migration expected to match one row') or create the same
    experiment twice. The lock is the operating system's, so a killed holder releases it.
    Yields whether a lock is held (False for a tracking server)."""
    path = store_lock_file(tracking_uri)
    if path is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # One object per file in this process, so holding it again (nested) does not deadlock.
    lock = FileLock(path, timeout=STORE_LOCK_TIMEOUT_S, is_singleton=True)
    try:
        lock.acquire()
    except Timeout as err:
        raise UserError(
            f"Another process has held {path} for over {STORE_LOCK_TIMEOUT_S} s while setting "
            f"up the MLflow store {tracking_uri}. Find it (e.g. `fuser {path}`) and stop it, or "
            "point logger.mlflow.tracking_uri elsewhere."
        ) from err
    try:
        yield True
    finally:
        lock.release()


def tracking_client(tracking_uri: str):
    """An MlflowClient of `tracking_uri`; the store is opened (and created) under the lock."""
    import mlflow

    with store_lock(tracking_uri):
        return mlflow.MlflowClient(tracking_uri)


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created as Lightning's MLFlowLogger would create it if there
    is none. Call it under `store_lock`."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def experiment_for(mlflow_cfg: DictConfig):
    """The MLflow client and experiment id of a logger config, creating the experiment as the
    logger would, with the same artifact location."""
    location = mlflow_cfg.get("artifact_location")
    if is_tracking_server(mlflow_cfg.tracking_uri):
        location = None  # as ContinuingMLFlowLogger: a tracking server keeps the files itself
    with store_lock(mlflow_cfg.tracking_uri):
        client = tracking_client(mlflow_cfg.tracking_uri)
        return client, ensure_experiment(client, mlflow_cfg.experiment_name, location)
