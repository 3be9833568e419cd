"""The MLflow logger of a training run: Lightning's, continuing a resumed run without recording
an epoch twice, its store set up under the store's lock."""

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from sem_cls.tracking.store import (
    ensure_experiment,
    is_tracking_server,
    store_lock,
    tracking_client,
)


def mlflow_loggers(loggers) -> list[MLFlowLogger]:
    return [logger for logger in loggers if isinstance(logger, MLFlowLogger)]


class ContinuingMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that, continuing an existing run (`run_id`), leaves out metric values the
    run already holds for a step: epochs replayed after a kill are not recorded twice.

    With a tracking server (http:// or https:// URI) `artifact_location` is ignored: the server
    keeps artifacts where it was told to (`mlflow server --artifacts-destination`), and a local
    path here would exist on this machine only.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str = "lightning_logs",  # MLFlowLogger's default
        artifact_location: str | None = None,
        run_id: str | None = None,
        **kwargs,
    ):
        if is_tracking_server(tracking_uri):
            artifact_location = None
        settings = dict(experiment_name=experiment_name, artifact_location=artifact_location)
        if rank_zero_only.rank > 0 and str(tracking_uri).startswith("sqlite:"):
            # DDP ranks > 0 never write to MLflow (Lightning hands them a dummy experiment), but
            # MLFlowLogger opens its store at once; ranks started together (srun, torchrun)
            # would all set up a new SQLite file at the same moment, and the schema setup of
            # one fails. They get a store of their own in memory instead.
            super().__init__(tracking_uri="sqlite:///:memory:", run_id=run_id, **settings, **kwargs)
        else:
            # The store is opened and the experiment made here, under the store's lock, not
            # lazily by Lightning, where runs started together would race to create them. A
            # tracking server needs no lock and is first reached when the run starts, as before.
            with store_lock(tracking_uri) as locked:
                super().__init__(tracking_uri=tracking_uri, run_id=run_id, **settings, **kwargs)
                if locked and run_id is None:
                    ensure_experiment(
                        tracking_client(tracking_uri), experiment_name, artifact_location
                    )
        self._recorded: dict[str, set[int]] | None = {} if run_id is None else None

    def _recorded_steps(self) -> dict[str, set[int]]:
        if self._recorded is None:
            run = self.experiment.get_run(self.run_id)
            self._recorded = {
                key: {m.step for m in self.experiment.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
            }
        return self._recorded

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        recorded = self._recorded_steps()
        fresh = {k: v for k, v in metrics.items() if (step or 0) not in recorded.get(k, ())}
        if fresh:
            super().log_metrics(fresh, step)
