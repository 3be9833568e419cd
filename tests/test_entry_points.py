"""train.py and eval.py as a user runs them: user errors end in one clear message. The first two
start the real command line; the others run it in this process (seconds instead of a new
interpreter's imports), as tests/test_config_errors.py does."""

from tests.helpers import assert_user_error, run_in_process
from tests.helpers import run_entry_point as run


def test_missing_data_says_where_to_put_it_and_how_to_run_the_demo(tmp_path):
    result = run("train.py", f"data.data_dir={tmp_path / 'no_such_dir'}", tmp_path=tmp_path)
    assert_user_error(result, str(tmp_path / "no_such_dir"), "<Class>/*.jpg", "make demo")


def test_an_override_typo_stops_before_anything_runs(tmp_path):
    result = run("train.py", "model.optimizr.lr=1e-3", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'model.optimizr.lr'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    assert not (tmp_path / "logs").exists()


def test_unavailable_pretrained_weights_stop_the_run(tiny_sem_dir, tmp_path):
    result = run_in_process("train.py", f"data.data_dir={tiny_sem_dir}", tmp_path=tmp_path)
    assert_user_error(result, "inception_v3", "model.weights_file", "model.pretrained=false")
    # Nothing trained on random weights, and no run was opened for it.
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_text("not a checkpoint")
    result = run_in_process("eval.py", f"ckpt_path={bogus}", tmp_path=tmp_path)
    assert_user_error(result, str(bogus), "not a sem-cls checkpoint")


def test_an_unknown_backbone_names_close_timm_models(tiny_sem_dir, tmp_path):
    result = run_in_process(
        "train.py",
        f"data.data_dir={tiny_sem_dir}",
        "model.backbone=inceptoin_v3",
        tmp_path=tmp_path,
    )
    assert_user_error(result, "inceptoin_v3", "inception_v3")


def test_resume_refuses_another_model_choice(tiny_sem_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    result = run_in_process(
        "train.py", f"resume={run_dir}", "model=efficientnet_lite0", tmp_path=tmp_path
    )
    assert_user_error(result, "model=efficientnet_lite0 would choose other config groups")
