"""A local demo page for a trained model: drop SEM images, see each one's class, its top-k
probabilities, the image as the model saw it (info bar cut), a Grad-CAM overlay, and the
uncertain and unknown flags. The same work is the API endpoint /classify (gradio_client).

python -m sem_cls.app ckpt_path=models:/sem-cls@champion port=7860

It serves 127.0.0.1 by default and reaches nothing beyond it: no analytics, no fonts or
scripts from the network. Classification is predict's own (classify_files, decide).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sem_cls.data.images import IMAGE_SUFFIXES
from sem_cls.errors import UserError, check_command_line, exits_on_user_error
from sem_cls.evaluation.saliency import as_seen, grad_cam, overlay
from sem_cls.models.engines import create_engine
from sem_cls.models.inference import (
    ImagesToClassify,
    classify_files,
    decide,
    unknown_images,
)
from sem_cls.registry import load_model

TABLE_HEADERS = ["image", "class", "confidence", "top classes", "uncertain", "unknown", "novelty",
                 "error"]  # fmt: skip


@dataclass
class Row:
    """One image's result on the page."""

    name: str
    decision: str  # the class, `uncertain`, `unknown`, or "" when unreadable
    top: list[tuple[str, float]]  # the top-k classes, most probable first
    uncertain: bool
    unknown: bool
    novelty: float  # NaN where not scored (a model without novelty scores, or unread)
    error: str  # why the file could not be read; "" when read
    seen: np.ndarray | None = field(
        default=None, repr=False
    )  # (H, W, 3) uint8, as the model saw it
    cam: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8, Grad-CAM overlay


class DemoClassifier:
    """A loaded model and the settings it classifies with, as predict would use them."""

    def __init__(self, cfg):
        if not (isinstance(cfg.top_k, int) and cfg.top_k >= 1):
            raise UserError(f"top_k={cfg.top_k}: give the number of classes to list, 1 or more.")
        threshold = cfg.min_confidence
        if threshold is not None and not (
            isinstance(threshold, int | float) and 0 <= threshold <= 1
        ):
            raise UserError(
                f"min_confidence={threshold} is not a probability: give a value from 0 to 1 "
                "(e.g. 0.5), or null to flag no image uncertain."
            )
        model, _, recorded = load_model(cfg.ckpt_path, cfg.get("tracking_uri"))
        if cfg.top_k > len(model.class_names):
            raise UserError(
                f"top_k={cfg.top_k}, but the model knows {len(model.class_names)} classes: give "
                f"1 to {len(model.class_names)}."
            )
        self.top_k, self.min_confidence = cfg.top_k, threshold
        self.max_pixels, self.batch_size = cfg.max_pixels, cfg.batch_size
        # Unset preprocessing follows what an MLflow model recorded (as predict does).
        self.info_bar = (
            cfg.info_bar if cfg.info_bar is not None else recorded.get("info_bar", "auto")
        )
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else recorded.get("bf16", True)
        device = (
            cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.model = model.to(device).eval()
        engine = cfg.get("engine") or recorded.get("engine", "torch")
        self.engine = None  # torch
        if engine != "torch":
            self.engine = create_engine(
                engine,
                self.model.backbone,
                tuple(model.data_config["input_size"]),
                self.bf16,
                Path(cfg.paths.cache_dir) / "engines",
            )

    def classify(self, files: list[Path]) -> list[Row]:
        """One row per file: class, top-k, flags, the image as seen and its Grad-CAM overlay;
        an unreadable file gets a row with its error, the others go on."""
        names = self.model.class_names
        probs, errors, novelty = classify_files(
            self.model,
            files,
            info_bar=self.info_bar,
            max_pixels=self.max_pixels,
            batch_size=self.batch_size,
            num_workers=0,  # a handful of files per request; workers would cost more than they save
            bf16=self.bf16,
            progress=False,
            engine=self.engine,
        )
        unknown = unknown_images(self.model, novelty)
        decisions = decide(probs, names, self.min_confidence, unknown)
        seen, cams = self.grad_cams(files, errors)
        rows = []
        for i, file in enumerate(files):
            if errors[i]:
                rows.append(Row(file.name, "", [], False, False, np.nan, errors[i]))
                continue
            order = np.argsort(-probs[i])[: self.top_k]
            top = [(names[c], float(probs[i, c])) for c in order]
            uncertain = self.min_confidence is not None and top[0][1] < self.min_confidence
            rows.append(
                Row(
                    file.name,
                    decisions[i],
                    top,
                    uncertain,
                    bool(unknown[i]),
                    float(novelty[i]),
                    "",
                    seen[i],
                    cams[i],
                )  # fmt: skip
            )
        return rows

    def grad_cams(self, files: list[Path], errors: list[str]) -> tuple[dict, dict]:
        """{index: image as seen}, {index: Grad-CAM overlay} of the readable files, preprocessed
        as classify_files preprocessed them."""
        dataset = ImagesToClassify(files, self.model.data_config, self.info_bar, self.max_pixels)
        readable = [i for i, error in enumerate(errors) if not error]
        device = next(self.model.parameters()).device
        seen, cams = {}, {}
        for start in range(0, len(readable), self.batch_size):
            chunk = readable[start : start + self.batch_size]
            images = torch.stack([dataset[i][0] for i in chunk])  # (B, 3, H, W)
            maps, _ = grad_cam(self.model, images.to(device))  # (B, H, W)
            for i, image, cam in zip(chunk, images, maps, strict=True):
                shown = as_seen(self.model, image)
                seen[i] = (shown.numpy() * 255).round().astype(np.uint8)
                cams[i] = overlay(shown, cam)
        return seen, cams


def table(rows: list[Row]) -> list[list]:
    """The rows as the page's table (TABLE_HEADERS)."""
    return [
        [
            row.name,
            row.decision,
            round(row.top[0][1], 4) if row.top else None,
            ", ".join(f"{name} {p:.3f}" for name, p in row.top),
            row.uncertain,
            row.unknown,
            None if np.isnan(row.novelty) else round(row.novelty, 4),
            row.error,
        ]
        for row in rows
    ]


def gallery(rows: list[Row]) -> list[tuple[np.ndarray, str]]:
    """Each readable image as the model saw it, then its Grad-CAM overlay, with captions."""
    items = []
    for row in rows:
        if row.error:
            continue
        items.append((row.seen, f"{row.name}: as seen"))
        items.append((row.cam, f"Grad-CAM: {row.top[0][0]}"))
    return items


def build_page(classifier: DemoClassifier):
    """The page: an upload box, a table of results and a gallery of what the model saw."""
    import gradio as gr

    def classify(files):
        if not files:
            raise gr.Error("Drop or pick one or more SEM images first.")
        rows = classifier.classify([Path(getattr(f, "name", f)) for f in files])
        return table(rows), gallery(rows)

    # Gradio 6's default fonts are served by the page itself (themes/base.py: LocalFont), with
    # system fonts after them: nothing is fetched from a font service.
    theme = gr.themes.Default(
        font=[gr.themes.LocalFont("IBM Plex Sans"), "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=[gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "monospace"],
    )
    names = ", ".join(classifier.model.class_names)
    flags = (
        f"uncertain: top class below {classifier.min_confidence}"
        if classifier.min_confidence is not None
        else "uncertain: off (min_confidence=null)"
    )
    with gr.Blocks(title="sem-cls", analytics_enabled=False) as page:
        gr.Markdown(
            f"## SEM image classes\nClasses: {names}.  \nFlags: {flags}; unknown: unlike the "
            "training images (a model with novelty scores)."
        )
        files = gr.File(
            label="SEM images",
            file_count="multiple",
            file_types=list(IMAGE_SUFFIXES),
            type="filepath",
            elem_id="images",
        )
        button = gr.Button("Classify", variant="primary")
        results = gr.Dataframe(
            headers=TABLE_HEADERS,
            label="Predictions",
            interactive=False,
            wrap=True,
            column_widths=["22%", "11%", "9%", "28%", "8%", "8%", "7%", "7%"],
            elem_id="predictions",
        )
        images = gr.Gallery(
            label="As the model saw each image (info bar cut), and where it looked (red)",
            columns=4,
            height="auto",
            object_fit="contain",
            elem_id="seen",
        )
        gr.on(
            [button.click, files.upload],
            classify,
            inputs=files,
            outputs=[results, images],
            api_name="classify",
        )
    return page, theme


def serve(cfg) -> None:
    """Load the model, then serve the page on cfg.host:cfg.port until interrupted."""
    if not (isinstance(cfg.port, int) and 1 <= cfg.port <= 65535):
        raise UserError(f"port={cfg.port}: give a TCP port from 1 to 65535, e.g. port=7860.")
    classifier = DemoClassifier(cfg)
    page, theme = build_page(classifier)
    print(f"Demo page of {cfg.ckpt_path}: http://{cfg.host}:{cfg.port}", flush=True)
    try:
        page.queue().launch(
            server_name=cfg.host,
            server_port=cfg.port,
            theme=theme,
            share=False,
            inbrowser=False,
            ssr_mode=False,  # no Node server beside Python
            show_error=True,
            quiet=True,
        )
    except OSError as err:  # the port is taken
        raise UserError(f"port={cfg.port}: {err}. Give another port=...") from err


def main() -> None:
    # Set before gradio is imported: it reads these when it loads.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import hydra

    check_command_line(Path(__file__).resolve().parents[1] / "conf", "app")

    @hydra.main(version_base="1.3", config_path="../conf", config_name="app")
    @exits_on_user_error
    def run(cfg) -> None:
        serve(cfg)

    run()


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main()
