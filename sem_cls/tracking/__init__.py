"""MLflow bookkeeping, the one package that talks to MLflow about runs: the store and its lock
(store), the logger (logger), a run's context, files and status (runs), sweep tags and
summaries (sweeps), and what a person reads of the runs (summary).

Each name is imported from its module when first used: the store's functions do not cost
Lightning's import (several seconds), which only the logger and the run callbacks need.
"""

import importlib

_MODULES = {
    "logger": ("ContinuingMLFlowLogger", "mlflow_loggers"),
    "runs": (
        "EXPERIMENT_KIND_TAG",
        "MODEL_TRAINING",
        "ReportArtifacts",
        "RunIdInCheckpoints",
        "end_run",
        "find_run",
        "git_state",
        "log_artifacts",
        "log_run_context",
        "mark_model_training",
        "run_callbacks",
        "run_status",
        "set_tags",
        "write_environment",
    ),
    "store": (
        "STORE_LOCK_TIMEOUT_S",
        "ensure_experiment",
        "experiment_for",
        "is_tracking_server",
        "store_lock",
        "store_lock_file",
        "tracking_client",
    ),
    "summary": ("differing_params", "print_summary", "runs_table"),
    "sweeps": (
        "SUMMARY_FILE",
        "SUMMARY_TAG",
        "print_best",
        "summarize_sweep",
        "summary_run",
        "sweep_id",
        "sweep_job",
        "sweep_tags",
    ),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
