"""The schemas of the `data` and `model` config groups, registered in Hydra's ConfigStore: the
YAML files extend them, Hydra checks types while composing, and `check_config` checks choices,
ranges and combinations right after. Imports nothing heavier than Hydra."""

import math
import traceback
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import MISSING, Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sem_cls.errors import UserError, exits_on_user_error


class Choice(StrEnum):
    """The values a config key may take. The schema's fields stay `str` and `__post_init__`
    checks them against their Choice: an Enum-typed field would hand Enum members on to the
    objects built from the config, and a checkpoint holding one in its hyperparameters no
    longer loads with `weights_only=True`."""


class FeatureEngine(Choice):
    """What runs a frozen backbone for its features (sem_cls.models.engines)."""

    auto = "auto"  # OpenVINO for a frozen backbone on one CPU process, torch elsewhere
    torch = "torch"
    openvino = "openvino"


class Sampler(Choice):
    none = "none"
    balanced = "balanced"  # every class drawn equally often in training


class LabelConflicts(Choice):
    """The same image under two class folders (sem_cls.data.ingest)."""

    drop = "drop"  # left out of training and evaluation
    keep = "keep"  # used under both labels
    refuse = "refuse"  # the folder is refused


class ClassWeighting(Choice):
    none = "none"
    balanced = "balanced"  # each class's loss weighed by n_images / (n_classes * count)


class Head(Choice):
    linear = "linear"
    mlp = "mlp"


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _require(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise UserError(f"{key}={value} {what}")


def _require_choice(key: str, value, choice: type[Choice]) -> None:
    names = [member.value for member in choice]
    _require(value in names, key, value, f"is not one of {', '.join(names)}.")


@dataclass
class SyntheticConfig:
    """The built-in SEM-like set generated into data.data_dir (sem_cls.data.synthetic)."""

    images_per_class: int = 40
    seed: int = 0
    info_bar_share: float = 0.6

    def __post_init__(self) -> None:
        key = "data.synthetic"
        _require(
            self.images_per_class >= 1,
            f"{key}.images_per_class",
            self.images_per_class,
            "must be 1 or more.",
        )
        _require(
            0 <= self.info_bar_share <= 1,
            f"{key}.info_bar_share",
            self.info_bar_share,
            "must be a share from 0 to 1.",
        )


@dataclass
class DataConfig:
    """conf/data/*.yaml: the folder, its split and the loaders (conf/data/nffa.yaml says more)."""

    data_dir: str = MISSING
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    seed: int = 42
    near_duplicate_bits: int = 8
    folds: int | None = None
    fold: int = 0
    manifest: str | None = None
    # Images left out of a new split, files untouched (sem_cls.data.exclude): an audit's
    # issues.csv, a CSV with a `path` column, a text file of paths, or a list of paths.
    exclude: Any = None
    info_bar: Any = "auto"  # auto | none | rows; OmegaConf 2.3 has no str-or-int type
    max_pixels: int = 50_000_000
    sampler: str = Sampler.none.value  # a Sampler
    label_conflicts: str = LabelConflicts.drop.value  # a LabelConflicts
    augment: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    num_workers: int = 2
    cache_features: bool = True
    cache_dir: str | None = None
    engine_dir: str | None = None
    bf16: bool = True
    engine: str = FeatureEngine.auto.value  # a FeatureEngine
    synthetic: SyntheticConfig | None = None
    missing_hint: str = ""

    def __post_init__(self) -> None:
        _require_choice("data.sampler", self.sampler, Sampler)
        _require_choice("data.engine", self.engine, FeatureEngine)
        _require_choice("data.label_conflicts", self.label_conflicts, LabelConflicts)
        split = list(self.split)
        _require(
            len(split) == 3 and min(split) > 0 and abs(sum(split) - 1) <= 1e-6,
            "data.split",
            split,
            "must be three positive shares (train, val, test) summing to 1, e.g. [0.7,0.15,0.15].",
        )
        _require(
            self.near_duplicate_bits >= -1 and self.near_duplicate_bits <= 64,
            "data.near_duplicate_bits",
            self.near_duplicate_bits,
            "must be from -1 (exact duplicates only) to 64.",
        )
        if self.folds is not None:
            _require(
                self.folds >= 2, "data.folds", self.folds, "must be 2 or more (or null: no folds)."
            )
            _require(
                0 <= self.fold < self.folds,
                "data.fold",
                self.fold,
                f"must be in 0..{self.folds - 1} (data.folds={self.folds}).",
            )
        _require(
            self.info_bar in ("auto", "none") or _is_count(self.info_bar, 0),
            "data.info_bar",
            self.info_bar,
            "must be auto, none or a number of pixel rows to cut from the bottom.",
        )
        _require(
            self.exclude is None or isinstance(self.exclude, str | list | tuple),
            "data.exclude",
            self.exclude,
            "must be a file (an audit's issues.csv, a CSV with a path column, or one path per "
            "line) or a list of image paths relative to data.data_dir.",
        )
        _require(self.max_pixels >= 1, "data.max_pixels", self.max_pixels, "must be 1 or more.")
        _require(
            self.batch_size >= 1,
            "data.batch_size",
            self.batch_size,
            "must be a whole number of 1 or more.",
        )
        _require(
            self.num_workers >= 0,
            "data.num_workers",
            self.num_workers,
            "must be a whole number of 0 or more (0: load in the main process).",
        )


@dataclass
class OptimizerConfig:
    """A torch optimizer built with `params=` by the model (`_partial_`); other keys of the
    chosen optimizer are added with `+model.optimizer.<key>=...`."""

    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.lr) and self.lr > 0,
            "model.optimizer.lr",
            self.lr,
            "must be a positive number, e.g. 1e-3.",
        )
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "model.optimizer.weight_decay",
            self.weight_decay,
            "must be 0 or more.",
        )


@dataclass
class ModelConfig:
    """conf/model/*.yaml: backbone, weights, freezing, head, loss and optimizer."""

    _target_: str = MISSING  # the model class; its name is no concern of the schema
    backbone: str = MISSING
    pretrained: bool = True
    weights_file: str | None = None
    freeze: Any = "all"  # all | none | N: OmegaConf 2.3 has no enum-or-int type
    unfreeze_after: int = 0
    layer_decay: float | None = None
    warmup_epochs: int = 0
    cosine_decay: bool = False
    head: str = Head.linear.value  # a Head
    head_hidden: int = 512
    head_dropout: float = 0.0
    aux_logits: bool = False
    mixup: dict[str, Any] | None = None
    compile: bool = False
    class_weighting: str = ClassWeighting.none.value  # a ClassWeighting
    label_smoothing: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        _require_choice("model.head", self.head, Head)
        _require_choice("model.class_weighting", self.class_weighting, ClassWeighting)
        freeze = self.freeze
        _require(
            freeze in ("all", "none") or isinstance(freeze, bool) or _is_count(freeze, 0),
            "model.freeze",
            freeze,
            "must be all (linear probe on a frozen backbone), none (fine-tune everything) or a "
            "number of last backbone stages to fine-tune.",
        )
        for key in ("unfreeze_after", "warmup_epochs"):
            value = getattr(self, key)
            _require(value >= 0, f"model.{key}", value, "must be a number of epochs, 0 or more.")
        _require(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "model.layer_decay",
            self.layer_decay,
            "must be in (0, 1], e.g. 0.75, or null.",
        )
        _require(self.head_hidden >= 1, "model.head_hidden", self.head_hidden, "must be 1 or more.")
        _require(
            0 <= self.head_dropout < 1,
            "model.head_dropout",
            self.head_dropout,
            "must be in [0, 1).",
        )
        _require(
            0 <= self.label_smoothing < 1,
            "model.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1), e.g. 0.1.",
        )

    @property
    def frozen(self) -> bool:
        """A linear probe: the whole backbone frozen (`all`, true or 0 stages learning)."""
        return (
            self.freeze is True
            or self.freeze == "all"
            or _is_count(self.freeze, 0)
            and not self.freeze
        )


# The YAML files of each group extend its schema (`- /<group>_schema@_here_` in their
# defaults), so every option of the group is checked alike.
SCHEMAS = {"data": DataConfig, "model": ModelConfig}


def register_schemas() -> None:
    """Called by hydra_plugins/sem_cls_schemas.py, which Hydra imports when it starts."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(name=f"{group}_schema", node=schema)


def _checked(key: str, node: DictConfig):
    """The section `key` of a config as its schema's object: types, choices and ranges checked."""
    try:
        values = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
        if isinstance(values.get("optimizer"), dict):  # keys of other optimizers are theirs
            known = {f.name for f in fields(OptimizerConfig)}
            values["optimizer"] = {k: v for k, v in values["optimizer"].items() if k in known}
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SCHEMAS[key]), values))
    except OmegaConfBaseException as err:
        user_error = err.__cause__ if isinstance(err.__cause__, UserError) else None
        if user_error is not None:  # a __post_init__ check, wrapped by OmegaConf
            raise user_error from None
        full_key = f"{key}.{err.full_key}" if err.full_key else key
        reason = str(err).splitlines()[0]
        raise UserError(f"{full_key}: {reason}.") from None


def _missing_keys(node: Container, prefix: str = ""):
    """Keys left `???`, without resolving interpolations (Hydra's own keys are Hydra's)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if prefix == "" and key == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node[key], Container):
            yield from _missing_keys(node[key], f"{prefix}{key}.")


def check_config(cfg: DictConfig) -> None:
    """Refuse a config with a required value left out (`???`, e.g. eval's ckpt_path), or whose
    `data` or `model` values are of the wrong type or out of range, or do not go together. Run
    by every entry point right after composition (and on a resumed run's saved config),
    before anything heavy is imported."""
    missing = list(_missing_keys(cfg))
    if missing:
        others = f" (nor has {', '.join(missing[1:])})" if missing[1:] else ""
        raise UserError(
            f"{missing[0]} has no value{others}: give it on the command line, {missing[0]}=..."
        )
    sections = {key: _checked(key, cfg[key]) for key in SCHEMAS if cfg.get(key) is not None}
    data, model = sections.get("data"), sections.get("model")
    if data and model and data.engine == FeatureEngine.openvino and not model.frozen:
        raise UserError(
            f"data.engine={data.engine} serves a frozen backbone only, but model.freeze="
            f"{model.freeze} fine-tunes it. Set data.engine=torch, or model.freeze=all."
        )


def check_sweep(config: DictConfig) -> None:
    """`check_config` on a sweep's config and on every value a discrete sweep over one key
    gives (`data.batch_size=0,16`), before the first job starts; interval(...) is the
    sweeper's to sample, and each job's config is checked again when it starts."""
    check_config(config)
    plain = OmegaConf.to_container(config, resolve=False, enum_to_str=True)
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        key = override.key_or_group
        if not override.is_discrete_sweep() or not isinstance(
            OmegaConf.select(config, key), int | float | str | bool | None
        ):
            continue  # a group choice (model=a,b) is checked when its job is composed
        for value in override.sweep_string_iterator():
            job = OmegaConf.create(plain)
            job.merge_with_dotlist([f"{key}={value}"])
            check_config(job)


def _check_or_exit(check, config: DictConfig) -> None:
    """Hydra turns what a callback raises into a warning and goes on; a refused config, or a
    check that failed, must stop the program instead."""
    try:
        exits_on_user_error(check)(config)
    except Exception as err:
        traceback.print_exc()
        raise SystemExit(f"Checking the config failed: {err!r}") from err


class ConfigCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): `check_config` on the composed config before
    Hydra creates the run's output folder, and on each job's config in a sweep (-m), whose
    swept values the sweep's own config does not hold yet."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_or_exit(check_config, config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_or_exit(check_sweep, config)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            _check_or_exit(check_config, config)
