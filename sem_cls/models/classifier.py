"""SEMClassifier: a timm backbone, frozen by default, with a new linear head (a LightningModule)."""

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.loggers import MLFlowLogger
from timm.data import resolve_model_data_config
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from sem_cls.errors import UserError
from sem_cls.models import backbones

CLASS_WEIGHTINGS = ("none", "balanced")


class SEMClassifier(LightningModule):
    """Backbone features -> linear head -> class logits; cross-entropy, Adam by default.

    With `freeze=True` the backbone is a fixed feature extractor: no gradients, BatchNorm in
    inference mode with its statistics frozen, so only the head learns.
    """

    def __init__(
        self,
        class_names: list[str],
        backbone: str = "inception_v3",
        pretrained: bool = True,
        weights_file: str | None = None,
        freeze: bool = True,
        optimizer=None,
        class_weighting: str = "none",
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if class_weighting not in CLASS_WEIGHTINGS:
            raise UserError(
                f"model.class_weighting={class_weighting!r} is not one of {list(CLASS_WEIGHTINGS)}."
            )
        if not 0 <= label_smoothing < 1:
            raise UserError(f"model.label_smoothing={label_smoothing} must be in [0, 1).")
        # The optimizer factory is rebuilt from config, not pickled into checkpoints.
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.class_names = list(class_names)
        self.optimizer_factory = optimizer
        # channels_last: about 1.5x faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
        self.backbone = backbones.create_backbone(backbone, pretrained, weights_file).to(
            memory_format=torch.channels_last
        )
        if freeze:
            backbones.freeze(self.backbone)
        self.frozen = freeze
        # What test passes are logged as: "test", or e.g. "external/lab_b" for another folder.
        self.test_split = "test"
        num_classes = len(self.class_names)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        # Linear-probe init: small weights, zero bias.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

        def accuracy(top_k=1):
            return MulticlassAccuracy(num_classes, top_k=top_k, average="micro")

        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.test_acc_top3 = accuracy(top_k=min(3, num_classes))
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.val_recall = MulticlassRecall(num_classes, average=None)
        self.test_recall = MulticlassRecall(num_classes, average=None)
        self.val_acc_best = MaxMetric()
        # Saved in checkpoints, so a resumed run still knows the best epoch before the kill.
        self.val_acc_best.persistent(True)
        # Training-loss weight per class; set from the training split's counts in setup().
        self.register_buffer("class_weights", torch.ones(num_classes), persistent=False)
        # Predictions of the current evaluation pass, for confusion matrix and report.
        self.eval_targets, self.eval_preds = CatMetric(), CatMetric()

    @property
    def data_config(self) -> dict:
        """Input size, mean/std and interpolation the backbone was trained with."""
        return resolve_model_data_config(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            # Dropout and stochastic depth inside a frozen backbone stay off while the head trains.
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(images)  # (B, 3, H, W) -> (B, num_features)
        else:
            features = self.backbone(images)
        return self.head(features)  # (B, num_features) -> (B, num_classes)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.class_weighting == "balanced" and datamodule:
            # sklearn's "balanced": n_samples / (n_classes * count), so rare classes weigh more.
            counts = datamodule.class_counts("train")
            weights = counts.sum() / (len(counts) * counts.clip(min=1))
            self.class_weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)

    def _step(self, batch, training: bool = False):
        inputs, targets = batch
        # (B, num_features) batches are cached backbone features: only the head runs.
        logits = self.head(inputs) if inputs.ndim == 2 else self(inputs)
        if training:
            # Weighting and smoothing shape what is learned; evaluation losses stay plain.
            loss = F.cross_entropy(
                logits,
                targets,
                weight=self.class_weights,
                label_smoothing=self.hparams.label_smoothing,
            )
        else:
            loss = F.cross_entropy(logits, targets)
        return loss, logits, targets

    def training_step(self, batch, batch_idx):
        loss, logits, targets = self._step(batch, training=True)
        self.train_loss(loss)
        self.train_acc(logits, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_validation_epoch_start(self):
        self.eval_targets.reset()
        self.eval_preds.reset()

    def validation_step(self, batch, batch_idx):
        loss, logits, targets = self._step(batch)
        self.val_loss(loss)
        self.val_acc(logits, targets)
        self.val_f1(logits, targets)
        self.val_recall(logits, targets)
        self.eval_targets.update(targets)
        self.eval_preds.update(logits.argmax(dim=1))
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/f1_macro", self.val_f1, on_step=False, on_epoch=True)

    def _log_recall(self, split: str, recall: MulticlassRecall) -> None:
        # Per-class recall beside accuracy: on imbalanced data a rare class can sit at 0.
        for name, value in zip(self.class_names, recall.compute(), strict=True):
            self.log(f"{split}/recall/{name}", value)
        recall.reset()

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.val_recall.reset()
            return
        self._log_recall("val", self.val_recall)
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_start(self):
        self.eval_targets.reset()
        self.eval_preds.reset()

    def test_step(self, batch, batch_idx):
        loss, logits, targets = self._step(batch)
        self.test_loss(loss)
        self.test_acc(logits, targets)
        self.test_acc_top3(logits, targets)
        self.test_f1(logits, targets)
        self.test_recall(logits, targets)
        self.eval_targets.update(targets)
        self.eval_preds.update(logits.argmax(dim=1))
        self.log(f"{self.test_split}/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log(f"{self.test_split}/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log(f"{self.test_split}/acc_top3", self.test_acc_top3, on_step=False, on_epoch=True)
        self.log(f"{self.test_split}/f1_macro", self.test_f1, on_step=False, on_epoch=True)

    def on_test_epoch_end(self):
        self._log_recall(self.test_split, self.test_recall)

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, predicted classes) of the last validation or test pass."""
        return self.eval_targets.compute().long(), self.eval_preds.compute().long()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lets eval.py link its results to the training run.
        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger):
                checkpoint["mlflow_run_id"] = logger.run_id

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("SEMClassifier needs an optimizer factory to train.")
        trainable = [p for p in self.parameters() if p.requires_grad]
        return self.optimizer_factory(params=trainable)
