"""MLflow bookkeeping, the one package that talks to MLflow about runs: the store and its lock
(store), the logger (logger), a run's context, files and status (runs), sweep tags and
summaries (sweeps), and what a person reads of the runs (summary)."""

from sem_cls.tracking.logger import ContinuingMLFlowLogger, mlflow_loggers
from sem_cls.tracking.runs import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    ReportArtifacts,
    RunIdInCheckpoints,
    end_run,
    find_run,
    git_state,
    log_artifacts,
    log_run_context,
    mark_model_training,
    run_callbacks,
    run_status,
    set_tags,
    write_environment,
)
from sem_cls.tracking.store import (
    STORE_LOCK_TIMEOUT_S,
    ensure_experiment,
    experiment_for,
    is_tracking_server,
    store_lock,
    store_lock_file,
    tracking_client,
)
from sem_cls.tracking.summary import differing_params, print_summary, runs_table
from sem_cls.tracking.sweeps import (
    SUMMARY_FILE,
    SUMMARY_TAG,
    print_best,
    summarize_sweep,
    summary_run,
    sweep_id,
    sweep_job,
    sweep_tags,
)

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING",
    "STORE_LOCK_TIMEOUT_S",
    "SUMMARY_FILE",
    "SUMMARY_TAG",
    "ContinuingMLFlowLogger",
    "ReportArtifacts",
    "RunIdInCheckpoints",
    "differing_params",
    "end_run",
    "ensure_experiment",
    "experiment_for",
    "find_run",
    "git_state",
    "is_tracking_server",
    "log_artifacts",
    "log_run_context",
    "mark_model_training",
    "mlflow_loggers",
    "print_best",
    "print_summary",
    "run_callbacks",
    "run_status",
    "runs_table",
    "set_tags",
    "store_lock",
    "store_lock_file",
    "summarize_sweep",
    "summary_run",
    "sweep_id",
    "sweep_job",
    "sweep_tags",
    "tracking_client",
    "write_environment",
]
