"""A demo page for a trained model: drop SEM images, see each one's class, its top-k
probabilities, the image as the model saw it (info bar cut), a Grad-CAM overlay, and the
uncertain and unknown flags. The same work is the API endpoint /classify (gradio_client).

python -m sem_cls.app ckpt_path=models:/sem-cls@champion port=7860

It serves 127.0.0.1 by default and reaches nothing beyond it: no analytics, no fonts or
scripts from the network. Another address needs a login (SEM_CLS_APP_USER and
SEM_CLS_APP_PASSWORD). Classification is the Predictor's (sem_cls.predictor), as predict's;
settings are checked before torch is imported, so a bad value answers at once.
"""

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sem_cls.config.predictor import PredictorSettings, check_exists
from sem_cls.errors import UserError, exits_on_user_error, run_command

TABLE_HEADERS = ["image", "class", "confidence", "top classes", "uncertain", "unknown", "novelty",
                 "error"]  # fmt: skip
# The login a page on any address but this machine's requires.
USER_VARIABLE, PASSWORD_VARIABLE = "SEM_CLS_APP_USER", "SEM_CLS_APP_PASSWORD"


@dataclass
class Row:
    """One image's result on the page."""

    name: str
    decision: str  # the class, `uncertain`, `unknown`, or "" when unreadable
    top: list[tuple[str, float]]  # the top-k classes, most probable first
    uncertain: bool
    unknown: bool
    novelty: float | None  # None where not scored (a model without novelty scores, or unread)
    error: str  # why the file could not be read; "" when read
    seen: Any = field(default=None, repr=False)  # (H, W, 3) uint8 array, as the model saw it
    cam: Any = field(default=None, repr=False)  # (H, W, 3) uint8 array, Grad-CAM overlay


class DemoClassifier:
    """A Predictor (as predict's) with the page's settings, and the pictures the page shows."""

    def __init__(self, cfg):
        from sem_cls.predictor import Predictor

        self.predictor = Predictor.load(
            cfg.ckpt_path,
            PredictorSettings.from_config(cfg),
            tracking_uri=cfg.get("tracking_uri"),
            cache_dir=cfg.paths.engine_dir,
            with_backbone=True,  # Grad-CAM runs the backbone module
        )
        self.model = self.predictor.model
        self.min_confidence = self.predictor.settings.min_confidence

    def classify(self, files: list[Path]) -> list[Row]:
        """One row per file: class, top-k, flags, the image as seen and its Grad-CAM overlay;
        an unreadable file gets a row with its error, the others go on."""
        from sem_cls.predictor import UNCERTAIN, UNKNOWN

        predictions = self.predictor.predict(files)
        seen, cams = self.grad_cams(files, [row["error"] for row in predictions])
        return [
            Row(
                Path(file).name,
                row["predicted_class"],
                row["top_k"],
                row["predicted_class"] == UNCERTAIN,
                row["predicted_class"] == UNKNOWN,
                row["novelty"],
                row["error"],
                seen.get(i),
                cams.get(i),
            )
            for i, (file, row) in enumerate(zip(files, predictions, strict=True))
        ]

    def grad_cams(self, files: list[Path], errors: list[str]) -> tuple[dict, dict]:
        """{index: image as seen}, {index: Grad-CAM overlay} of the readable files, preprocessed
        as the Predictor preprocessed them."""
        import numpy as np
        import torch

        from sem_cls.evaluation.saliency import as_seen, grad_cam, overlay

        dataset = self.predictor.dataset(files)
        readable = [i for i, error in enumerate(errors) if not error]
        batch_size = self.predictor.settings.batch_size
        seen, cams = {}, {}
        for start in range(0, len(readable), batch_size):
            chunk = readable[start : start + batch_size]
            images = torch.stack([dataset[i][0] for i in chunk])  # (B, H, W, 3) uint8
            maps, _ = grad_cam(self.model, images.to(self.predictor.device))  # (B, H, W)
            for i, image, cam in zip(chunk, images, maps, strict=True):
                shown = as_seen(image)
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
            None if row.novelty is None else round(row.novelty, 4),
            row.error,
        ]
        for row in rows
    ]


def gallery(rows: list[Row]) -> list[tuple[Any, str]]:
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

    from sem_cls.data.images import IMAGE_SUFFIXES

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
    names = ", ".join(classifier.predictor.class_names)
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


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine alone (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: other machines may resolve it
        return False


def login(cfg) -> tuple[str, str] | None:
    """The login the page asks for: none on this machine's loopback address; on any other
    address the user's SEM_CLS_APP_USER and SEM_CLS_APP_PASSWORD, without which it refuses."""
    if is_loopback(str(cfg.host)):
        return None
    user, password = os.environ.get(USER_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    if not (user and password):
        raise UserError(
            f"host={cfg.host} serves the page to other machines, so it needs a login: set "
            f"{USER_VARIABLE} and {PASSWORD_VARIABLE} in the environment (e.g. "
            f"{USER_VARIABLE}=alice {PASSWORD_VARIABLE}=... make app HOST={cfg.host}), or serve "
            "this machine alone with host=127.0.0.1."
        )
    return user, password


def check_config(cfg) -> tuple[str, str] | None:
    """Refuse a bad port, a bad setting, a checkpoint that is not there or a missing login
    before anything heavy is imported; the login, if one is needed."""
    if not (isinstance(cfg.port, int) and 1 <= cfg.port <= 65535):
        raise UserError(f"port={cfg.port}: give a TCP port from 1 to 65535, e.g. port=7860.")
    PredictorSettings.from_config(cfg)
    auth = login(cfg)
    check_exists(cfg.ckpt_path)
    return auth


def serve(cfg) -> None:
    """Load the model, then serve the page on cfg.host:cfg.port until interrupted."""
    auth = check_config(cfg)
    classifier = DemoClassifier(cfg)
    page, theme = build_page(classifier)
    print(f"Demo page of {cfg.ckpt_path}: http://{cfg.host}:{cfg.port}", flush=True)
    try:
        page.queue().launch(
            server_name=cfg.host,
            server_port=cfg.port,
            theme=theme,
            share=False,
            auth=auth,
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

    @hydra.main(version_base="1.3", config_path="../conf", config_name="app")
    @exits_on_user_error
    def run(cfg) -> None:
        serve(cfg)

    run_command(run)  # one composition; Hydra's refusals end with exit code 2


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
    main()
