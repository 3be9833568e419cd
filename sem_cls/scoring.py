"""A whole archive classified with Ray Data: files and objects listed in the driver
(sem_cls.archive_inputs), read, checked, cropped and resized in CPU tasks, classified by an
actor pool that holds one Predictor per actor, and written by the driver as Parquet shards into
an output folder that a rerun resumes (sem_cls.score_output).

The rows are predict's (sem_cls.predictor.Predictor.rows, the one decision), plus the file's
size and modification time, which identify a file already scored, the model, the engine and
the Ray node that classified it. Ray is imported here only, by the functions that need it.
"""

import contextlib
import gc
import logging
import os
import secrets
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from sem_cls.archive_inputs import InputFile, ObjectStore, read_inputs
from sem_cls.config.predictor import PredictorSettings
from sem_cls.errors import UserError
from sem_cls.score_output import ScoreOutput, shard_schema

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
# How long the actor pool may take to start (each imports torch and loads the model).
ACTORS_START_TIMEOUT_S = 600
BATCHES_PER_BLOCK = 4


@dataclass
class Scored:
    """What a run scored: its summary and its MLflow run say this."""

    decisions: Counter = field(default_factory=Counter)  # images per class, unknown, uncertain
    errors: int = 0  # unreadable files
    images_per_s: float = 0.0
    actors: int = 0
    nodes: dict = field(default_factory=dict)  # images per Ray node


def prepare_images(
    batch: dict, data_config: dict, info_bar, max_pixels: int, stores: list[ObjectStore]
) -> dict:
    """A Ray task: read (a file, or an object from its store), check, crop and resize a batch as
    predict does (the predictor's dataset), (B, H, W, 3) uint8 images and each one's error."""
    from sem_cls.predictor import ImagesToClassify

    items, read_errors = read_inputs(batch["path"], batch["store"], stores)
    dataset = ImagesToClassify(items, data_config, info_bar, max_pixels)
    images, errors = [], []
    for index, listed_error in enumerate(batch["error"]):
        image, error = dataset[index]
        images.append(image.numpy())
        errors.append(listed_error or read_errors[index] or error)
    return {**batch, "image": np.stack(images), "error": np.array(errors, dtype=object)}


class ImageClassifier:
    """A Ray actor: one Predictor built once from the model the driver loaded, classifying
    batches into shard rows. With `prepare` (prepare_images' settings) it reads and prepares
    each batch itself: on CPU actors that saves moving every image tensor between processes.
    `engine`: the Predictor's engine arguments (cache_dir, weights, converted); with
    the converted backbone in `converted`, an actor needs neither timm nor the backbone."""

    def __init__(self, model, settings: dict, reference: str, prepare=None, engine=None):
        import ray
        import torch

        from sem_cls.predictor import Predictor

        # Ray Data hands constructor args on as they are: the refs are fetched here.
        engine = {key: _fetched(ray, value) for key, value in (engine or {}).items()}
        settings = PredictorSettings(**settings)
        self.predictor = Predictor(_fetched(ray, model), settings, {}, **engine)
        self.reference = reference
        self.engine = self.predictor.engine_name  # the one resolved, not `auto`
        self.node = ray.get_runtime_context().get_node_id()
        self.torch = torch
        self.prepare = prepare

    def __call__(self, batch: dict) -> dict:
        if self.prepare is not None:
            batch = prepare_images(batch, **self.prepare)
        errors = [str(error) for error in batch["error"]]
        probabilities, novelty = self.predictor.score_images(self.torch.from_numpy(batch["image"]))
        unread = np.array([bool(error) for error in errors])
        probabilities[unread], novelty[unread] = np.nan, np.nan
        rows = self.predictor.rows(list(batch["path"]), probabilities, novelty, errors)
        top_k = self.predictor.settings.top_k
        columns = {
            "path": batch["path"],
            "size": batch["size"],
            "mtime_ns": batch["mtime_ns"],
            "predicted_class": np.array([row["predicted_class"] for row in rows], dtype=object),
            "confidence": _numbers(row["confidence"] for row in rows),
            "novelty": _numbers(row["novelty"] for row in rows),
        }
        for rank in range(top_k):
            ranked = [row["top_k"][rank] if row["top_k"] else ("", None) for row in rows]
            columns[f"top{rank + 1}_class"] = np.array([c or None for c, _ in ranked], dtype=object)
            columns[f"top{rank + 1}_prob"] = _numbers(p for _, p in ranked)
        columns["error"] = np.array(errors, dtype=object)
        columns["model"] = np.array([self.reference] * len(rows), dtype=object)
        columns["engine"] = np.array([self.engine] * len(rows), dtype=object)
        columns["node"] = np.array([self.node] * len(rows), dtype=object)
        return columns


def _fetched(ray, value):
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _numbers(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def check_address(address: str) -> None:
    """An address to connect to answers within CONNECT_TIMEOUT_S, or the run stops naming it:
    Ray itself would retry for a minute or more."""
    if address == "auto":
        return  # Ray finds the cluster this node belongs to, or says there is none at once
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"ray.address={address} is not host:port, ray://host:port or auto; leave it unset "
            "(null) to start a local Ray on this machine."
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(
            f"ray.address={address} does not answer ({err.strerror or err}). Start the cluster "
            "(`ray start --head`), check the address, or leave ray.address unset for a local Ray."
        ) from None


def start_ray(address: str | None, cpus: int | None):
    """Connect to the cluster at `address`, or start a local Ray sized to this machine. A local
    Ray always starts anew (address="local"): a killed earlier head leaves a record of its
    cluster behind, which a plain ray.init() would try to join."""
    import ray

    options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if address is None:
        ray.init(address="local", num_cpus=cpus, **options)
    else:
        import sem_cls

        # The project's code travels with the job: a node needs the environment, not the code.
        runtime_env = {"py_modules": [os.path.dirname(sem_cls.__file__)]}
        try:
            ray.init(address=str(address), runtime_env=runtime_env, **options)
        except (ConnectionError, RuntimeError) as err:
            raise UserError(f"ray.address={address}: {str(err).splitlines()[0]}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Work starts once the whole pool is up: otherwise the first actor ready takes the first
    # blocks, and a small job (or one on a loaded node) runs on one actor, one node.
    context.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int | None):
    """start_ray, and Ray shut down on leaving."""
    ray = start_ray(address, cpus)
    try:
        yield ray
    finally:
        # Object refs left in reference cycles (the dataset's) are freed while Ray is up: one
        # freed after the shutdown, by a collection in another thread, ends the process.
        gc.collect()
        ray.shutdown()


def pool_size(resources: dict, ray_cfg) -> int:
    """Actors that fit on the cluster. GPU actors leave room for the decoding tasks beside them:
    a pool that takes every CPU leaves none for decoding, and the job never progresses. CPU
    actors decode their own batches, so they may take every CPU."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    per_actor = ray_cfg.cpus_per_actor
    per_task = ray_cfg.decode_cpus if ray_cfg.gpus_per_actor else 0
    fit = int((cpus - per_task) // per_actor) if per_actor > 0 else int(cpus)
    if ray_cfg.gpus_per_actor:
        fit = min(fit, int(gpus // ray_cfg.gpus_per_actor))
    if fit < 1:
        raise UserError(
            f"The Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: one decoding task "
            f"(ray.decode_cpus={per_task}) and one actor (ray.cpus_per_actor={per_actor}, "
            f"ray.gpus_per_actor={ray_cfg.gpus_per_actor}) do not fit. Lower them or add nodes."
        )
    if ray_cfg.actors is None:
        return fit
    if ray_cfg.actors > fit:
        raise UserError(
            f"ray.actors={ray_cfg.actors}, but only {fit} fit on this cluster beside the "
            f"decoding tasks ({cpus:g} CPUs, {gpus:g} GPUs); give ray.actors={fit} or fewer, "
            "or null to size the pool to the cluster."
        )
    return ray_cfg.actors


class Progress:
    """A line every few seconds: images done, images/s, time left. The rate counts from the
    first batch back, so Ray's and the actors' start (seconds, once) do not hide the rate that
    scales with the job; the start is said once."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.done, self.every_s = total, 0, every_s
        self.start = self.last = time.monotonic()
        self.first = None  # (time, images) when the first batch came back

    def update(self, count: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, count)
            log.info("First images back %.1f s after the job started", now - self.start)
        self.done += count
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self._rate(now)
            left = _duration((self.total - self.done) / rate if rate else float("inf"))
            log.info(
                "Scored %d/%d images, %.1f images/s, %s left", self.done, self.total, rate, left
            )

    @property
    def rate(self) -> float:
        return self._rate(time.monotonic())

    def _rate(self, now: float) -> float:
        if self.first is None or self.done == self.first[1]:  # one batch back: the whole time
            return self.done / max(now - self.start, 1e-9)
        return (self.done - self.first[1]) / max(now - self.first[0], 1e-9)


def _duration(seconds: float) -> str:
    """h:mm:ss, hours past 24 included; ? before the first image."""
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def run_scoring(
    ray,
    files: list[InputFile],
    stores: list[ObjectStore],
    output: ScoreOutput,
    predictor,
    reference: str,
    ray_cfg,
    shard_rows: int,
    engine_dir: str | None = None,
) -> "Scored":
    """Score `files` on Ray (the started module) into `output`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    actors = pool_size(ray.cluster_resources(), ray_cfg)
    settings = predictor.settings
    log.info(
        "Ray: %s; %d actor(s), %s CPU(s) each; %d images to score",
        ray.cluster_resources(),
        actors,
        ray_cfg.cpus_per_actor,
        len(files),
    )
    items = [asdict(f) for f in files]  # path, size, mtime_ns, error, store
    prepare = dict(
        data_config=predictor.model.data_config,
        info_bar=settings.info_bar,
        max_pixels=settings.max_pixels,
        stores=stores,
    )
    # Blocks of a few whole batches, a task of about a second each: Ray's own split of 2,000
    # rows is 40-row blocks, each a batch of 32 and one of 8 and a task's costs (measured:
    # 168 against 195 images/s on 2 actors). A few files still make several blocks for each
    # actor, so that no actor is left without work.
    rows_per_block = settings.batch_size * BATCHES_PER_BLOCK
    blocks = max(-(-len(items) // rows_per_block), min(len(items), BATCHES_PER_BLOCK * actors))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    if ray_cfg.gpus_per_actor:
        # GPU actors classify; CPU tasks beside them read and prepare the images.
        dataset = dataset.map_batches(
            prepare_images,
            fn_kwargs=prepare,
            batch_size=settings.batch_size,
            num_cpus=ray_cfg.decode_cpus,
        )
        prepare = None
    engine = {"cache_dir": engine_dir}
    if predictor.engine_name == "openvino":
        # The converted backbone travels with the model: an actor on any node loads it as it
        # is, without timm, the backbone's weights or a conversion of its own.
        engine["weights"] = predictor.engine.weights
        engine["converted"] = ray.put(predictor.engine.converted_files())
    model = ray.put(predictor.model.cpu())
    dataset = dataset.map_batches(
        ImageClassifier,
        fn_constructor_args=(model, _settings_dict(settings), reference, prepare, engine),
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ray_cfg.cpus_per_actor,
        num_gpus=ray_cfg.gpus_per_actor,
        # Ray Data spreads its actors over the nodes (SPREAD, its default): their disks and
        # networks work too.
    )
    schema = shard_schema(settings.top_k)
    # The run's own shard names: in a PID namespace every driver is process 1.
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{secrets.token_hex(4)}"
    progress = Progress(len(files))
    decisions, errors, pending, count, shards = Counter(), 0, [], 0, 0
    nodes = Counter()
    last_write = time.monotonic()

    def flush():
        nonlocal pending, count, shards, last_write
        if pending:
            table = pa.concat_tables(pending)
            output.write_shard(table, f"part-{stamp}-{shards:06d}.parquet")
            shards += 1
        pending, count, last_write = [], 0, time.monotonic()

    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch = batch.select(schema.names).cast(schema)
        pending.append(batch)
        count += batch.num_rows
        failed = pc.not_equal(batch["error"], "")
        decisions.update(pc.filter(batch["predicted_class"], pc.invert(failed)).to_pylist())
        errors += pc.sum(failed).as_py() or 0
        nodes.update(batch["node"].to_pylist())
        progress.update(batch.num_rows)
        # A killed driver loses at most one shard's rows, which a rerun scores again.
        if count >= shard_rows or time.monotonic() - last_write > 60:
            flush()
    flush()
    return Scored(decisions, errors, progress.rate, actors, dict(nodes))


def _settings_dict(settings: PredictorSettings) -> dict:
    """Settings as plain values for the actors (the engine as its name)."""
    values = dict(vars(settings))
    if values["engine"] is not None:
        values["engine"] = str(getattr(values["engine"], "value", values["engine"]))
    return values
