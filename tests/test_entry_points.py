"""The entry points as a user runs them: each real command line once, and user errors that end
in one clear message. Tests that need no new interpreter run the entry point in this process
(seconds instead of a new interpreter's imports), as tests/test_config_errors.py does."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, assert_user_error, run_in_process
from tests.helpers import run_entry_point as run

HEAVY = ("torch", "lightning", "mlflow", "timm")
MISSING = "/nonexistent/sem-cls"


def run_module(module: str, *overrides: str, tmp_path) -> subprocess.CompletedProcess:
    """`python -m <module> <overrides>` from the project folder, with outputs in tmp_path."""
    return subprocess.run(
        [sys.executable, "-m", module, f"paths.log_dir={tmp_path / 'logs'}", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("target", "overrides", "named"),
    [
        ("train.py", ["model.optimizer.lrr=0.1"], ["model.optimizer.lrr"]),
        ("train.py", ["data.batch_size=0"], ["data.batch_size=0"]),
        ("eval.py", ["data.num_workers=1"], ["ckpt_path"]),
        # What only the file system can tell, still told before the heavy imports; a missing
        # data folder says where to put the images and how to run the demo instead.
        ("train.py", [f"data.data_dir={MISSING}"], [MISSING, "<Class>/*.jpg", "make demo"]),
        ("eval.py", [f"ckpt_path={MISSING}.ckpt"], [f"ckpt_path={MISSING}.ckpt"]),
        ("sem_cls.ingest", [f"data.data_dir={MISSING}"], [MISSING, "make demo"]),
        ("sem_cls.predict", [f"ckpt_path={MISSING}.ckpt", "inputs=."], [f"{MISSING}.ckpt"]),
        ("sem_cls.app", [f"ckpt_path={MISSING}.ckpt"], [f"ckpt_path={MISSING}.ckpt"]),
    ],
)
def test_a_refused_command_line_imports_no_training_stack(target, overrides, named, tmp_path):
    # What the interpreter holds when it exits: a refusal must not pay for torch's import.
    script = (
        "import atexit, runpy, sys\n"
        "heavy = sys.argv[1].split(',')\n"
        "atexit.register(lambda: print('heavy:', [m for m in heavy if m in sys.modules], "
        "file=sys.stderr))\n"
        "target = sys.argv[2]\n"
        "sys.argv = sys.argv[2:]\n"
        "if target.endswith('.py'):\n"
        "    runpy.run_path(target, run_name='__main__')\n"
        "else:\n"
        "    runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
    )
    target = str(ROOT / target) if target.endswith(".py") else target
    result = subprocess.run(
        [sys.executable, "-c", script, ",".join(HEAVY), target, *overrides,
         f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert_user_error(result, *named)
    assert "heavy: []" in result.stderr, result.stderr[-2000:]


def test_ingest_writes_the_split_a_training_run_would_use(tiny_sem_dir, tmp_path):
    result = run_module(
        "sem_cls.ingest",
        f"data.data_dir={tiny_sem_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Split fingerprint" in result.stdout
    manifests = list((tmp_path / "logs" / "ingest").rglob("data/manifest.csv"))
    assert len(manifests) == 1
    rows = manifests[0].read_text().splitlines()
    assert len(rows) - 1 == sum(1 for p in tiny_sem_dir.rglob("*") if p.suffix == ".jpg")


def test_download_refuses_an_unreachable_record_in_one_message(tmp_path):
    # Port 9 on loopback: nothing listens, so the connection is refused at once.
    result = run_module(
        "sem_cls.data.download",
        "download.base_url=http://127.0.0.1:9",
        "retries=0",
        f"target_dir={tmp_path / 'nffa'}",
        tmp_path=tmp_path,
    )
    assert_user_error(result, "127.0.0.1:9")
    assert not (tmp_path / "nffa").exists() or not any((tmp_path / "nffa").iterdir())


def test_compare_names_a_store_without_runs(tmp_path):
    result = run_module(
        "sem_cls.compare", f"paths.mlruns_dir={tmp_path / 'mlruns'}", tmp_path=tmp_path
    )
    assert_user_error(result, "No run in", str(tmp_path / "mlruns"))
    assert not (tmp_path / "mlruns").exists()  # a question creates no store


def test_eval_asks_for_the_checkpoint(tmp_path):
    result = run("eval.py", tmp_path=tmp_path)
    assert_user_error(result, "ckpt_path")


def test_a_data_folder_without_class_folders_says_what_to_put_there(tmp_path):
    empty = tmp_path / "nffa"
    (empty / "notes").mkdir(parents=True)  # there, but no <Class>/ folder with images
    result = run_in_process("sem_cls.ingest", f"data.data_dir={empty}", tmp_path=tmp_path)
    assert_user_error(result, str(empty), "<Class>/*.jpg", "make demo")


def test_an_override_typo_stops_before_anything_runs(tmp_path):
    result = run("train.py", "model.optimizr.lr=1e-3", tmp_path=tmp_path)
    assert_user_error(result, "model.optimizr.lr")
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
    # A data folder that is there (empty): the checkpoint is what is refused.
    result = run_in_process(
        "eval.py", f"ckpt_path={bogus}", f"data.data_dir={tmp_path}", tmp_path=tmp_path
    )
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
