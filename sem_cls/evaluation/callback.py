"""EvaluationReports: write reports for the best validation epoch and for each test pass into the
run's output folder (sem_cls.tracking logs them to MLflow)."""

import logging
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler

from sem_cls.errors import UserError
from sem_cls.evaluation.reports import write_evaluation, write_reports
from sem_cls.evaluation.scores import expected_calibration_error, split_scores

log = logging.getLogger(__name__)


def in_split_order(trainer, split: str, *arrays):
    """`arrays` (predictions of an evaluation pass, gathered from every rank) in the split's
    order, each image once. Under DDP, Lightning gives rank r every world_size-th image of the
    split through a DistributedSampler, padded with repeats to equal shares, and the metrics
    gather rank after rank; with one process the order is already the split's."""
    world = trainer.world_size
    samples = getattr(trainer.datamodule, "samples", {}).get(split)
    if world == 1 or not samples:
        return arrays
    shares = [DistributedSampler(samples, world, rank, shuffle=False) for rank in range(world)]
    gathered = np.concatenate([list(share) for share in shares])
    if len(gathered) != len(arrays[0]):
        log.warning("%s: predictions not in split order; per-image reports may mismatch.", split)
        return arrays
    first = torch.as_tensor(np.unique(gathered, return_index=True)[1])
    return tuple(array[first] for array in arrays)


class EvaluationReports(Callback):
    """Reports for `val` (at the best epoch) and for every test pass (`test`, `external/<name>`).

    The best epoch is judged as the ModelCheckpoint of the same `monitor` judges it (its `mode`,
    min or max), so the validation report belongs to the checkpoint that is kept. Keeping its
    predictions spares a second pass over the validation set; it has confusion matrices and the
    classification report. Test passes also get top-3 accuracy, macro and weighted F1, seeded
    bootstrap intervals for accuracy and macro-F1, calibration, the most confident mistakes and
    per-image predictions; their scores are logged as `<split>/<name>` metrics too.
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
        self.output_dir = Path(output_dir)
        self.monitor = monitor
        self.settings = {
            "bootstrap_resamples": bootstrap_resamples,
            "confidence_level": confidence_level,
            "calibration_bins": calibration_bins,
            "gallery_size": gallery_size,
            "seed": seed,
        }
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
            self.best_predictions = in_split_order(trainer, "val", *pl_module.predictions())

    def state_dict(self) -> dict:
        # In checkpoints: a resumed run still writes the report of the best epoch before a kill.
        return {"best_score": self.best_score, "best_predictions": self.best_predictions}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state["best_score"]
        self.best_predictions = state["best_predictions"]

    def on_fit_end(self, trainer, pl_module):
        if self.best_predictions is not None and trainer.is_global_zero:
            targets, preds = (t.cpu().numpy() for t in self.best_predictions)
            out_dir = self.output_dir / "val"
            write_reports(
                out_dir, targets, preds, pl_module.class_names, self._title("val", targets, preds)
            )
            log.info("val reports in %s", out_dir)

    def on_test_epoch_end(self, trainer, pl_module):
        # Here, not in on_test_end, so the scores can still be logged as metrics of the pass.
        for split in pl_module.test_sets:  # "test", "external/<name>": the datamodule's names
            self._report_test_set(trainer, pl_module, split)

    def _report_test_set(self, trainer, pl_module, split: str) -> None:
        targets, probs, raw_probs, novelty = in_split_order(
            trainer,
            split,
            pl_module.predictions(split)[0],
            pl_module.probabilities(split),
            pl_module.probabilities(split, calibrated=False),
            pl_module.novelty_of_test_pass(split),
        )
        targets, probs = targets.cpu().numpy(), probs.cpu().double().numpy()
        raw_probs, novelty = raw_probs.cpu().double().numpy(), novelty.cpu().double().numpy()
        settings = self.settings
        scores = split_scores(
            targets,
            probs,
            settings["bootstrap_resamples"],
            settings["confidence_level"],
            settings["seed"],
            settings["calibration_bins"],
        )
        # Calibration's effect: the same pass before temperature scaling.
        scores["ece_uncalibrated"] = expected_calibration_error(
            targets, raw_probs, settings["calibration_bins"]
        )
        scores["temperature"] = float(pl_module.temperature)
        extra = ("acc_ci_low", "acc_ci_high", "f1_macro_ci_low", "f1_macro_ci_high")
        names = [*extra, "f1_weighted", "ece", "ece_uncalibrated"]
        if not np.isnan(novelty).any():
            # Images past the novelty threshold: ~its validation share on the test split, more
            # on images unlike the training ones.
            scores["unknown_share"] = float((novelty > float(pl_module.novelty_threshold)).mean())
            names.append("unknown_share")
        else:
            novelty = None
        for name in names:
            # Every rank computed the same scores from the gathered predictions.
            pl_module.log(f"{split}/{name}", scores[name], sync_dist=True, add_dataloader_idx=False)
        if not trainer.is_global_zero:
            return
        out_dir = self.output_dir / split
        write_evaluation(
            out_dir,
            targets,
            probs,
            pl_module.class_names,
            self._samples(trainer, split, len(targets)),
            self._title(split, targets, probs.argmax(axis=1)),
            scores,
            settings,
            novelty,
            float(pl_module.novelty_threshold),
        )
        log.info("%s reports in %s", split, out_dir)

    @staticmethod
    def _title(split, targets, preds) -> str:
        return f"{split}: {len(targets)} images, accuracy {(targets == preds).mean():.3f}"

    @staticmethod
    def _samples(trainer, split: str, count: int):
        """The images of the pass in loader order (test loaders do not shuffle): the set's
        samples in the datamodule (a split, or a further test set such as an external folder)."""
        samples = getattr(trainer.datamodule, "samples", {}).get(split)
        if samples is None or len(samples) != count:
            log.warning("No image paths for %s: its reports list predictions without them.", split)
            return None
        return samples
