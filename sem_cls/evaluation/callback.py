"""SplitScores: every evaluation pass scored once, from the predictions of all ranks in set
order; EvaluationReports: those scores and report files for the best validation epoch and for
each test pass, in the run's output folder (sem_cls.tracking logs them to MLflow)."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning import Callback
from lightning.pytorch.trainer.states import TrainerFn

from sem_cls.data.metric_keys import metric_key
from sem_cls.data.samples import in_set_order
from sem_cls.errors import UserError
from sem_cls.evaluation.reports import write_evaluation, write_reports
from sem_cls.evaluation.scores import (
    class_recall,
    expected_calibration_error,
    split_scores,
    validation_scores,
)

log = logging.getLogger(__name__)


class SplitScores(Callback):
    """The one place evaluation passes are scored. The model's validation and test steps return
    each batch's predictions (sample index, target, logits, novelty); here they are gathered from
    every rank, put in the set's order by sample index (sem_cls.data.samples.in_set_order),
    scored with scikit-learn (sem_cls.evaluation.scores) and logged as `<set>/<score>`:
    `val/loss`, `val/acc`, `val/acc_best`, `val/f1_macro`, `val/recall/<class>` every epoch;
    for each test pass (`test`, `external/<name>`) those, top-3 accuracy, weighted F1, bootstrap
    intervals, calibration error and the share of `unknown` images. runner.build_trainer adds
    one when the callbacks config has none (EvaluationReports is one, which also writes files).
    """

    def __init__(
        self,
        bootstrap_resamples: int = 1000,
        confidence_level: float = 0.95,
        calibration_bins: int = 15,
        seed: int = 0,
    ):
        self.settings = {
            "bootstrap_resamples": bootstrap_resamples,
            "confidence_level": confidence_level,
            "calibration_bins": calibration_bins,
            "seed": seed,
        }
        self.outputs: dict[str, list[dict]] = {}  # set name -> step outputs of this pass
        self.predictions: dict[str, SetPredictions] = {}  # set name -> the last pass's
        self.best_acc = None  # val/acc_best, kept in checkpoints

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc = state.get("best_acc")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.outputs = {}

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.outputs.setdefault("val", []).append(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        names = getattr(trainer.datamodule, "test_set_names", None) or ["test"]
        self.outputs.setdefault(names[dataloader_idx], []).append(outputs)

    def _gathered(self, pl_module, name: str) -> "SetPredictions":
        gathered = in_set_order(pl_module, self.outputs.pop(name, []))
        logits = gathered["logits"]
        predictions = SetPredictions(
            targets=gathered["target"].long().cpu().numpy(),
            probs=pl_module.model.probabilities(logits).cpu().double().numpy(),
            raw_probs=logits.softmax(dim=1).cpu().double().numpy(),
            novelty=gathered["novelty"].cpu().double().numpy(),
            loss=float(F.cross_entropy(logits, gathered["target"].long())),
        )
        self.predictions[name] = predictions
        return predictions

    def _log(self, pl_module, name: str, scores: dict) -> None:
        # Every rank scored the same gathered predictions, so the ranks' values agree.
        for key, value in scores.items():
            pl_module.log(f"{name}/{key}", value, sync_dist=True, add_dataloader_idx=False)

    def _recall(self, pl_module, predictions: "SetPredictions") -> dict[str, float]:
        # Per-class recall beside accuracy: on imbalanced data a rare class can sit at 0.
        values = class_recall(predictions.targets, predictions.preds, len(pl_module.class_names))
        # Any folder name, as MLflow keeps it (sem_cls.data.metric_keys).
        names = [metric_key(name) for name in pl_module.class_names]
        return {f"recall/{name}": v for name, v in zip(names, values, strict=True)}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            self.outputs = {}
            return
        val = self._gathered(pl_module, "val")
        scores = {"loss": val.loss, **validation_scores(val.targets, val.probs)}
        self.best_acc = max(scores["acc"], self.best_acc or 0.0)
        self._log(
            pl_module, "val", {**scores, "acc_best": self.best_acc, **self._recall(pl_module, val)}
        )

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # Here, not in on_test_end, so the scores can still be logged as metrics of the pass.
        for name in list(self.outputs):
            test = self._gathered(pl_module, name)
            self._log(
                pl_module,
                name,
                {**self.test_scores(pl_module, test), **self._recall(pl_module, test)},
            )

    def test_scores(self, pl_module, test: "SetPredictions") -> dict[str, float]:
        settings = self.settings
        scores = split_scores(
            test.targets,
            test.probs,
            settings["bootstrap_resamples"],
            settings["confidence_level"],
            settings["seed"],
            settings["calibration_bins"],
        )
        scores["loss"] = test.loss
        # Calibration's effect: the same pass before temperature scaling.
        scores["ece_uncalibrated"] = expected_calibration_error(
            test.targets, test.raw_probs, settings["calibration_bins"]
        )
        if test.scored_novelty:
            # Images past the novelty threshold: ~its validation share on the test split, more
            # on images unlike the training ones.
            threshold = float(pl_module.model.novelty_threshold)
            scores["unknown_share"] = float((test.novelty > threshold).mean())
        test.scores = scores
        return scores


@dataclass
class SetPredictions:
    """The predictions of one evaluation pass over a set, in the set's order."""

    targets: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C) temperature-scaled
    raw_probs: np.ndarray  # (N, C) before temperature scaling
    novelty: np.ndarray  # (N,) NaN where not scored
    loss: float  # mean cross-entropy of the logits
    scores: dict = field(default_factory=dict)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def scored_novelty(self) -> bool:
        return len(self.novelty) > 0 and not np.isnan(self.novelty).any()


class EvaluationReports(SplitScores):
    """SplitScores, and report files for `val` (at the best epoch) and for every test pass
    (`test`, `external/<name>`).

    The best epoch is judged as the ModelCheckpoint of the same `monitor` judges it (its `mode`,
    min or max), so the validation report belongs to the checkpoint that is kept. Keeping its
    predictions spares a second pass over the validation set; it has confusion matrices and the
    classification report. Test passes also get the scores (metrics.json), calibration, the most
    confident mistakes and per-image predictions.
    """

    def __init__(
        self,
        output_dir: str,
        monitor: str = "val/acc",
        bootstrap_resamples: int = 1000,
        confidence_level: float = 0.95,
        calibration_bins: int = 15,
        gallery_size: int = 16,
        seed: int = 0,
    ):
        super().__init__(bootstrap_resamples, confidence_level, calibration_bins, seed)
        self.output_dir = Path(output_dir)
        self.monitor = monitor
        self.gallery_size = gallery_size
        self.mode = None  # the ModelCheckpoint's, when fitting starts
        self.best_score = None
        self.best_predictions = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        modes = {c.mode for c in trainer.checkpoint_callbacks if c.monitor == self.monitor}
        if len(modes) != 1:
            raise UserError(
                f"Evaluation reports follow the checkpoint of monitor {self.monitor}, but "
                f"{'no' if not modes else 'more than one'} ModelCheckpoint with that monitor "
                f"({'none' if not modes else ' and '.join(sorted(modes))} mode) is configured. "
                "Set callbacks.evaluation_reports.monitor to the monitor of "
                "callbacks.model_checkpoint."
            )
        (self.mode,) = modes

    def _improves(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and self._improves(score.item()):
            self.best_score = score.item()
            val = self.predictions["val"]
            # Tensors, which checkpoints load with weights_only; numpy arrays they refuse.
            self.best_predictions = (torch.from_numpy(val.targets), torch.from_numpy(val.preds))

    def state_dict(self) -> dict:
        # In checkpoints: a resumed run still writes the report of the best epoch before a kill.
        return {
            **super().state_dict(),
            "best_score": self.best_score,
            "best_predictions": self.best_predictions,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.best_score = state["best_score"]
        self.best_predictions = state["best_predictions"]

    def on_fit_end(self, trainer, pl_module):
        if self.best_predictions is not None and trainer.is_global_zero:
            targets, preds = (p.numpy() for p in self.best_predictions)
            out_dir = self.output_dir / "val"
            write_reports(
                out_dir, targets, preds, pl_module.class_names, self._title("val", targets, preds)
            )
            log.info("val reports in %s", out_dir)

    def on_test_epoch_end(self, trainer, pl_module):
        names = list(self.outputs)
        super().on_test_epoch_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        for name in names:
            self._write_test_set(trainer, pl_module, name, self.predictions[name])

    def _write_test_set(self, trainer, pl_module, split: str, test: SetPredictions) -> None:
        out_dir = self.output_dir / split
        threshold = float(pl_module.model.novelty_threshold)
        scores = {**test.scores, "temperature": float(pl_module.model.temperature)}
        write_evaluation(
            out_dir,
            test.targets,
            test.probs,
            pl_module.class_names,
            self._samples(trainer, split, len(test.targets)),
            self._title(split, test.targets, test.preds),
            scores,
            {**self.settings, "gallery_size": self.gallery_size},
            test.novelty if test.scored_novelty else None,
            threshold,
        )
        log.info("%s reports in %s", split, out_dir)

    @staticmethod
    def _title(split, targets, preds) -> str:
        return f"{split}: {len(targets)} images, accuracy {(targets == preds).mean():.3f}"

    @staticmethod
    def _samples(trainer, split: str, count: int):
        """The images of the pass in set order (predictions are placed by sample index): the
        set's samples in the datamodule (a split, or a further test set such as an external
        folder)."""
        samples = getattr(trainer.datamodule, "samples", {}).get(split)
        if samples is None or len(samples) != count:
            log.warning("No image paths for %s: its reports list predictions without them.", split)
            return None
        return samples
