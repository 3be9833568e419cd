"""`make ui`: where each experiment's training runs are in the MLflow UI, printed before the UI
starts. MLflow 3's UI opens an experiment in its GenAI view (traces) until "Model training" is
chosen once in its sidebar, a setting each browser keeps for itself.

python -m sem_cls.tracking.ui sqlite:///$PWD/mlruns/mlflow.db http://127.0.0.1:5000
"""

import sys

from sem_cls.tracking.store import store_not_created, tracking_client


def experiment_runs_urls(tracking_uri: str, ui_url: str) -> list[tuple[str, str]]:
    """(name, address) of the training runs page of every experiment in the store, as the
    MLflow UI at `ui_url` shows it; none where the SQLite store does not exist yet (opening it
    would create it)."""
    if store_not_created(tracking_uri):
        return []
    experiments = tracking_client(str(tracking_uri)).search_experiments()
    return [
        (e.name, f"{ui_url.rstrip('/')}/#/experiments/{e.experiment_id}/runs")
        for e in sorted(experiments, key=lambda e: e.name)
    ]


def print_experiment_urls(tracking_uri: str, ui_url: str) -> None:
    """Where each experiment's training runs are in the UI, and the one toggle to press."""
    experiments = experiment_runs_urls(tracking_uri, ui_url)
    if not experiments:
        print(f"No experiment in {tracking_uri} yet: `make demo` records one.")
    for name, url in experiments:
        print(f"{name}: {url}")
    print('In the UI, choose "Model training" once in the sidebar to see these as runs.')


if __name__ == "__main__":
    print_experiment_urls(*sys.argv[1:3])
