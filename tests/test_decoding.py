"""Decoding at the scale the model needs: JPEGs decoded by DCT scaling (PIL's draft mode) give
the features of a full decode, and the evaluation transform is timm's, within a grey level on a
few pixels, and gives its features."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.nn.functional import cosine_similarity

from sem_cls.data.images import open_image
from sem_cls.data.samples import (
    EvalTransform,
    Sample,
    SEMImageDataset,
    eval_preprocessing,
    normalised,
)
from sem_cls.models.build import build_model
from sem_cls.models.engines import TorchEngine
from tests.helpers import LITE0


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "inception_v3", "resnet18"])
def test_evaluation_transform_is_timms(name):
    config = timm.data.resolve_model_data_config(timm.create_model(name, num_classes=0))
    timms = timm.data.create_transform(**config, is_training=False)
    ours, _ = eval_preprocessing(config)
    assert isinstance(ours, EvalTransform)
    # It keys the feature cache: the same in every process, another for another config.
    assert repr(ours) == repr(eval_preprocessing(dict(config))[0]) and "0x" not in repr(ours)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    rng = np.random.default_rng(0)
    for width, height in [(1024, 768), (512, 384), (768, 1024), (300, 301), (1023, 700)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        pixels = ours(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == (*config["input_size"][1:], 3)
        # Resizing only the crop's box rounds a few pixels one grey level otherwise.
        ours_normalised = normalised(pixels[None], config["mean"], config["std"])[0]
        levels = ((ours_normalised - timms(image)) * std * 255).abs()
        assert levels.max() <= 1.001 and (levels > 0.01).float().mean() < 0.002, (width, height)


def test_features_of_the_uint8_path_are_those_of_timms_transform(real_sem_dir):
    """Pixels handed over as uint8 and normalised as a batch give the features that timm's
    transform, normalised per image, gave."""
    model = build_model([str(i) for i in range(10)], **LITE0)[0].eval()
    config = model.data_config
    timms = timm.data.create_transform(**config, is_training=False)
    ours, _ = eval_preprocessing(config)
    engine = TorchEngine(model.backbone, config, bf16=False)
    images = []
    for path in sorted(real_sem_dir.rglob("*.jpg")):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    with torch.inference_mode():
        before = model.backbone(torch.stack([timms(image) for image in images]))
        after = engine(torch.stack([ours(image) for image in images]))
    assert cosine_similarity(before, after).min() >= 0.9999


def test_draft_decoded_jpegs_give_the_features_of_a_full_decode(real_sem_dir):
    model = build_model([str(i) for i in range(10)], **LITE0)[0].eval()
    transform, decode_side = eval_preprocessing(model.data_config)
    files = sorted(real_sem_dir.rglob("*.jpg"))
    assert files, "real JPEGs to decode"
    samples = []
    for path in files:
        with Image.open(path) as image:
            width, height = image.size
        # The lowest 8% cut as an info bar would be: the box scales with the decode.
        samples.append(Sample(path, 0, (0, 0, width, int(height * 0.92)), (width, height), ""))
    draft = SEMImageDataset(samples, transform, decode_side)
    full = SEMImageDataset(samples, transform, 0)
    reduced, _ = open_image(files[0], "RGB", decode_side)
    assert reduced.size[0] < samples[0].size[0], "decoded at a reduced scale"
    with torch.inference_mode():
        features = [
            model.features(torch.stack([dataset[i]["image"] for i in range(len(samples))]))
            for dataset in (draft, full)
        ]
    similarity = cosine_similarity(*features)
    print(f"cosine draft vs full decode: min {similarity.min():.4f}, mean {similarity.mean():.4f}")
    assert similarity.min() >= 0.99


def test_prediction_crops_each_image_as_ingest_and_training_do(
    sem_bars_dir, real_sem_dir, tmp_path
):
    """Prediction decodes each file once and finds its bar on that decode: the pixels it hands
    the model equal those of ingest's check plus training's loader, which decode twice."""
    from sem_cls.data.infobar import InfoBarCrop
    from sem_cls.data.ingest import check_image
    from sem_cls.data.synthetic import generate_dataset
    from sem_cls.predictor import ImagesToClassify

    generate_dataset(tmp_path / "generated", images_per_class=2, seed=3, size=(1024, 768))
    rotated = tmp_path / "rotated.jpg"  # a camera's EXIF turn: the bar is found upright
    with Image.open(sorted((tmp_path / "generated").rglob("*.jpg"))[0]) as image:
        exif = image.getexif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    files = [rotated] + [
        path
        for folder in (sem_bars_dir, real_sem_dir, tmp_path / "generated")
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in (".jpg", ".png", ".tif", ".tiff")
    ]
    data_config = build_model([str(i) for i in range(10)], **LITE0)[0].data_config
    transform, decode_side = eval_preprocessing(data_config)
    predicted = ImagesToClassify(files, data_config, "auto", 50_000_000)
    crop, cropped = InfoBarCrop("auto"), 0
    for index, path in enumerate(files):
        record = check_image(path)
        assert not record["error"], (path, record["error"])
        size = (record["width"], record["height"])
        cropped += record["bar_top"] < record["height"]
        sample = Sample(path, 0, crop.box(*size, record["bar_top"]), size, record["sha256"])
        trained = SEMImageDataset([sample], transform, decode_side)[0]["image"]
        image, error = predicted[index]
        assert error == ""
        assert torch.equal(image, trained), path
    assert cropped >= 10, "images with an info bar among them"
