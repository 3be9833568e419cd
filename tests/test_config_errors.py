"""Config errors end in one message naming the value, exit code 2, and no MLflow run. The entry
points run in this process here (tests/test_entry_points.py runs their real command lines)."""

import pytest
import torch
from omegaconf import OmegaConf

from sem_cls.errors import UserError
from tests.helpers import assert_user_error, compose_config, tiny_training_overrides
from tests.helpers import run_in_process as run

# Each refusal of docs/reliability.md's list that comes from the config schema
# (sem_cls/config/schema.py) or from Hydra's composition, and the value it must name.
TRAIN_CASES = {
    "lr_negative": (["model.optimizer.lr=-1"], "model.optimizer.lr=-1"),
    "lr_nan": (["model.optimizer.lr=nan"], "model.optimizer.lr=nan"),
    "lr_inf": (["model.optimizer.lr=inf"], "model.optimizer.lr=inf"),
    "lr_not_a_number": (["model.optimizer.lr=fast"], "model.optimizer.lr=fast"),
    "batch_size": (["data.batch_size=0"], "data.batch_size=0"),
    "batch_size_not_whole": (["data.batch_size=1.5"], "data.batch_size=1.5"),
    "num_workers": (["data.num_workers=-1"], "data.num_workers=-1"),
    "split": (["data.split=[0.8,0.3,0.1]"], "data.split=[0.8, 0.3, 0.1]"),
    "fold": (["data.folds=5", "data.fold=5"], "data.fold=5"),
    "info_bar": (["data.info_bar=bottom"], "data.info_bar=bottom"),
    "engine": (["data.engine=tensorrt"], "data.engine=tensorrt"),
    "sampler": (["data.sampler=oversample"], "data.sampler=oversample"),
    "freeze": (["model.freeze=some"], "model.freeze=some"),
    "head": (["model.head=transformer"], "model.head=transformer"),
    "class_weighting": (["model.class_weighting=inverse"], "model.class_weighting=inverse"),
    "label_smoothing": (["model.label_smoothing=1"], "model.label_smoothing=1.0"),
    "layer_decay": (["model.layer_decay=1.5"], "model.layer_decay=1.5"),
    "engine_with_fine_tuning": (
        ["data.engine=openvino", "model.freeze=none"],
        "data.engine=openvino",
    ),
    "unknown_key": (["nosuchkey=1"], "nosuchkey"),
    "unknown_nested_key": (["model.optimizer.lrr=0.1"], "model.optimizer.lrr"),
    "unknown_option": (["model=nosuchmodel"], "nosuchmodel"),
    "malformed": (["model.optimizer.lr=[1"], "model.optimizer.lr=[1"),
    # A sweep's typo, and a bad value among the swept ones, stop it before its first job.
    "sweep_unknown_key": (
        ["-m", "model.optimizer.lr=1e-3,3e-4", "nosuchkey=1"],
        "nosuchkey",
    ),
    "sweep_bad_value": (["-m", "data.batch_size=16,0"], "data.batch_size=0"),
}


def no_mlflow_run(tmp_path) -> bool:
    database = tmp_path / "mlruns" / "mlflow.db"
    if not database.exists():
        return True
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return not client.search_runs(experiments)


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_a_bad_config_before_anything_runs(case, tiny_sem_dir, tmp_path):
    overrides, named = TRAIN_CASES[case]
    result = run("train.py", *tiny_training_overrides(tiny_sem_dir), *overrides, tmp_path=tmp_path)
    assert_user_error(result, named)
    assert "HYDRA_FULL_ERROR" not in result.stderr
    assert no_mlflow_run(tmp_path)
    assert not (tmp_path / "logs").exists()  # refused before Hydra made an output folder


@pytest.mark.parametrize(
    ("target", "overrides", "named"),
    [
        ("eval.py", [], "ckpt_path"),
        ("eval.py", ["ckpt_path=a.ckpt", "data.batch_size=0"], "data.batch_size=0"),
        ("sem_cls.ingest", ["data.split=[0.5,0.5]"], "data.split=[0.5, 0.5]"),
        ("sem_cls.ingest", ["data.sampler=x"], "data.sampler=x"),
        ("sem_cls.compare", ["data.batch_size=0"], "data.batch_size=0"),
        ("sem_cls.compare", ["top=many"], "top=many"),
    ],
)
def test_other_entry_points_refuse_a_bad_config(target, overrides, named, tmp_path):
    result = run(target, *overrides, tmp_path=tmp_path)
    assert_user_error(result, named)
    assert not (tmp_path / "logs").exists()


def test_resume_checks_the_saved_config_with_the_new_values(tiny_sem_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = compose_config("train", tmp_path, tiny_training_overrides(tiny_sem_dir))
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    result = run("train.py", f"resume={run_dir}", "data.batch_size=0", tmp_path=tmp_path)
    assert_user_error(result, "data.batch_size=0")
    assert no_mlflow_run(tmp_path)


def test_train_refuses_a_data_folder_of_one_class(tiny_sem_dir, tmp_path):
    one_class = tmp_path / "one_class"
    (one_class / "Fibres").mkdir(parents=True)
    for image in sorted((tiny_sem_dir / "Fibres").iterdir())[:4]:
        (one_class / "Fibres" / image.name).write_bytes(image.read_bytes())
    overrides = [*tiny_training_overrides(tiny_sem_dir), f"data.data_dir={one_class}"]
    result = run("train.py", *overrides, tmp_path=tmp_path)
    assert_user_error(result, str(one_class), "two or more class folders")
    assert no_mlflow_run(tmp_path)


def test_resume_refuses_a_last_checkpoint_carrying_code(tiny_sem_dir, tmp_path):
    from tests.helpers import PlantedCode

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    marker = tmp_path / "code_ran"
    last = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"hyper_parameters": {"class_names": ["a"]}, "x": PlantedCode(marker)}, last)
    # The saved config is a whole training config, as a run leaves it.
    cfg = compose_config("train", tmp_path, tiny_training_overrides(tiny_sem_dir))
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    result = run("train.py", f"resume={run_dir}", tmp_path=tmp_path)
    assert_user_error(result, str(last), "is not a sem-cls checkpoint")
    assert not marker.exists()
    assert no_mlflow_run(tmp_path)


def test_eval_and_predict_refuse_a_folder_as_checkpoint(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    result = run("eval.py", f"ckpt_path={folder}", f"data.data_dir={tmp_path}", tmp_path=tmp_path)
    assert_user_error(result, f"ckpt_path={folder} is a folder")
    assert no_mlflow_run(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    result = run("sem_cls.predict", f"ckpt_path={folder}", f"inputs={image}", tmp_path=tmp_path)
    assert_user_error(result, f"ckpt_path={folder} is a folder")


@pytest.mark.parametrize(
    ("override", "named"),
    [("min_confidence=1.5", "min_confidence=1.5"), ("min_confidence=-0.1", "min_confidence=-0.1"),
     ("top_k=0", "top_k=0"), ("batch_size=0", "batch_size=0"), ("nosuchkey=1", "nosuchkey")],
)  # fmt: skip
def test_predict_refuses_bad_settings_before_loading_the_model(override, named, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    result = run(
        "sem_cls.predict", f"ckpt_path={tmp_path / 'no.ckpt'}", f"inputs={image}", override,
        tmp_path=tmp_path,
    )  # fmt: skip
    assert_user_error(result, named)


def test_predict_refuses_top_k_above_the_number_of_classes(trained_run, tiny_sem_dir, tmp_path):
    from tests.helpers import best_checkpoint, run_predict

    with pytest.raises(UserError, match=r"top_k=11, but the model knows 10 classes"):
        run_predict(
            trained_run, tmp_path, best_checkpoint(trained_run[0]), tiny_sem_dir, "top_k=11"
        )
