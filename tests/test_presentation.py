"""What people see first: report figures that show every label, and MLflow opening the runs in
its model-training view."""

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from sem_cls.evaluation.reports import plot_matrix
from sem_cls.tracking import EXPERIMENT_KIND_TAG, ContinuingMLFlowLogger, print_summary
from sem_cls.tracking.ui import print_experiment_urls

NFFA_CLASSES = [
    "Biological", "Fibres", "Films_Coated_Surface", "MEMS_devices_and_electrodes", "Nanowires",
    "Particles", "Patterned_surface", "Porous_Sponge", "Powder", "Tips",
]  # fmt: skip


def test_confusion_matrix_png_has_a_white_margin_on_every_side(tmp_path):
    # Long class names last too, where the last column and its label meet the right edge.
    for names in (NFFA_CLASSES, NFFA_CLASSES[::-1], NFFA_CLASSES[:3]):
        n = len(names)
        matrix = np.full((n, n), 1234)
        path = plot_matrix(tmp_path / "cm.png", matrix, names, "test: 3,175 images\nshare", "d")
        grey = np.asarray(Image.open(path).convert("L"))
        rows, columns = np.nonzero(grey < 250)  # anything drawn
        height, width = grey.shape
        margins = rows.min(), columns.min(), height - 1 - rows.max(), width - 1 - columns.max()
        assert min(margins) >= 20, (names[-1], margins)  # 0.25 inch at 100 dpi, nothing cut


def test_experiments_open_in_the_model_training_view(trained_run):
    cfg, _, client, run = trained_run
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_make_ui_prints_where_each_experiment_s_runs_are(trained_run, capsys):
    cfg, _, client, run = trained_run
    uri = cfg.logger.mlflow.tracking_uri
    print_experiment_urls(uri, "http://127.0.0.1:5000")
    experiment = client.get_experiment(run.info.experiment_id)
    runs_page = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
    out = capsys.readouterr().out
    assert f"{experiment.name}: {runs_page}" in out
    assert '"Model training"' in out


def test_make_ui_before_any_run_creates_no_store(tmp_path, capsys):
    database = tmp_path / "mlruns" / "mlflow.db"
    print_experiment_urls(f"sqlite:///{database}", "http://127.0.0.1:5000")
    assert "No experiment" in capsys.readouterr().out
    assert not database.exists()


def test_a_run_ends_by_saying_where_it_is_recorded(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = ContinuingMLFlowLogger(tracking_uri=uri, experiment_name="sem-cls-demo")
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}})
    print_summary([logger], {"test/acc": 0.5}, cfg)
    out = capsys.readouterr().out
    assert "test/acc = 0.5000" in out
    assert f"MLflow run {logger.run_id} in experiment 'sem-cls-demo'" in out
    assert f"tracking URI: {uri}" in out
    assert f"Output folder: {tmp_path / 'run'}" in out
