"""What `python score.py` does: classify a whole archive on Ray (sem_cls.scoring) into Parquet
shards, with the rows predict would write, and record the job as an MLflow run.

Run again with the same output, it scores only the files not yet scored (same path, size and
modification time). Settings are checked before Ray or torch is imported.
"""

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from sem_cls.config.predictor import UNCERTAIN, UNKNOWN, PredictorSettings, check_exists
from sem_cls.errors import UserError

log = logging.getLogger(__name__)


def check_ray_config(ray_cfg) -> None:
    for name in ("cpus_per_actor", "gpus_per_actor", "decode_cpus"):
        value = ray_cfg[name]
        if isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0):
            raise UserError(f"ray.{name}={value} must be a number of 0 or more.")
    if ray_cfg.decode_cpus <= 0 or (ray_cfg.cpus_per_actor <= 0 and not ray_cfg.gpus_per_actor):
        raise UserError(
            "ray.decode_cpus and ray.cpus_per_actor (or ray.gpus_per_actor) must be above 0: a "
            "task or actor that asks for nothing is scheduled without limit."
        )
    actors = ray_cfg.actors
    if actors is not None and (
        isinstance(actors, bool) or not isinstance(actors, int) or actors < 1
    ):
        raise UserError(
            f"ray.actors={actors}: give a number of 1 or more, or null (sized to the cluster)."
        )


def summary(decisions: Counter, errors: int, total_rows: int, skipped: int) -> str:
    lines = [
        f"{sum(decisions.values()) + errors} images scored: {sum(decisions.values())} classified "
        f"({decisions[UNKNOWN]} unknown, {decisions[UNCERTAIN]} uncertain), {errors} unreadable "
        f"(see the error column); {skipped} already scored in an earlier run; {total_rows} rows in "
        "the output",
    ]
    for name, count in sorted(decisions.items(), key=lambda item: -item[1]):
        lines.append(f"  {name:<30} {count}")
    return "\n".join(lines)


def log_job(cfg, params: dict, metrics: dict, class_counts: Counter, started: float) -> str:
    """The job as an MLflow run: what was scored with what, counts, images/s, per-class table
    and bar chart. Returns its run id."""
    from matplotlib.figure import Figure

    from sem_cls.tracking.store import ensure_experiment, store_lock, tracking_client

    with store_lock(cfg.tracking_uri):
        client = tracking_client(cfg.tracking_uri)
        experiment = ensure_experiment(client, cfg.experiment_name, None)
    run = client.create_run(experiment, start_time=int(started * 1000), run_name="score")
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:6000])
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    names = sorted(class_counts, key=lambda name: -class_counts[name])
    table = {"class": names, "images": [class_counts[name] for name in names]}
    client.log_table(run_id, table, "class_counts.json")
    figure = Figure(figsize=(8, 4))  # no pyplot: nothing global to set up or close
    axes = figure.subplots()
    axes.bar(names, table["images"])
    axes.set_ylabel("images")
    axes.set_title("Images per class")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    client.log_figure(run_id, figure, "class_counts.png")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def import_recording() -> None:
    """What log_job imports (MLflow, matplotlib: a second or more), imported while Ray starts
    instead of after the scoring."""
    import matplotlib.figure  # noqa: F401

    import sem_cls.tracking.store  # noqa: F401


def load_predictor(cfg, settings: PredictorSettings):
    """The model, loaded once here: one that is not there stops the run before anything is
    written, and the actors get it through Ray's object store, so no node needs the tracking
    store. The driver converts the backbone once into engine_dir; the actors get that
    conversion with the model (GPU actors run the backbone itself)."""
    from sem_cls.predictor import Predictor

    return Predictor.load(
        str(cfg.ckpt_path),
        settings,
        tracking_uri=cfg.get("tracking_uri"),
        cache_dir=cfg.paths.engine_dir,
        with_backbone=bool(cfg.ray.gpus_per_actor),
    )


def score_files(ray, cfg, predictor, files, stores, output):
    """Score the files not yet in `output`, holding its lock: (what was scored, files scored
    before, rows in the output)."""
    from sem_cls.scoring import Scored, run_scoring

    lock = output.open({"written_by": "python score.py", "format": 1})
    try:
        done = output.scored()  # again, now that no other run writes here
        todo = [f for f in files if f.key not in done]
        skipped = len(files) - len(todo)
        log.info("%d files; %d already scored in %s", len(files), skipped, output.folder)
        scored = Scored()
        if todo:
            scored = run_scoring(
                ray,
                todo,
                stores,
                output,
                predictor,
                str(cfg.ckpt_path),
                cfg.ray,
                cfg.shard_rows,
                engine_dir=str(cfg.paths.engine_dir),
            )
        return scored, skipped, len(output.scored())
    finally:
        lock.release()


def score(cfg) -> Path:
    """Score every image of cfg.inputs not yet in cfg.output with the model of cfg.ckpt_path."""
    settings = PredictorSettings.from_config(cfg)  # before anything heavy is imported
    check_ray_config(cfg.ray)
    if not isinstance(cfg.shard_rows, int) or cfg.shard_rows < 1:
        raise UserError(f"shard_rows={cfg.shard_rows} must be a whole number of 1 or more.")
    started = time.time()
    from sem_cls.archive_inputs import list_inputs, redacted_inputs
    from sem_cls.score_output import ScoreOutput
    from sem_cls.scoring import check_address, ray_session  # no torch: Ray starts sooner

    output = ScoreOutput(Path(cfg.output))
    output.check()  # each refusal before the work, so it costs nothing
    if cfg.ray.address is not None:
        check_address(str(cfg.ray.address))
    files, left_out, stores = list_inputs(cfg.inputs)  # a store that does not answer stops it
    check_exists(cfg.ckpt_path)
    # No Ray at all when every file was scored before (what is scored only grows).
    done = output.scored()
    starts_ray = any(f.key not in done for f in files)
    # The model loads, and MLflow is imported, in a thread while Ray starts, each taking
    # seconds; Ray's processes are tied to the thread that starts them, so that is this one.
    with ThreadPoolExecutor(1, thread_name_prefix="score") as background:
        loading = background.submit(load_predictor, cfg, settings)
        background.submit(import_recording)
        address, cpus = cfg.ray.address, cfg.ray.get("num_cpus")
        with ray_session(address, cpus) if starts_ray else nullcontext() as ray:
            predictor = loading.result()
            scored, skipped, total_rows = score_files(ray, cfg, predictor, files, stores, output)
            decisions, errors = scored.decisions, scored.errors
            print(f"{summary(decisions, errors, total_rows, skipped)}\nScores: {output.folder}")
            for path in left_out[:20]:
                log.warning("Left out (not an image file by its suffix): %s", path)
            # Recorded while Ray shuts down.
            recording = background.submit(
                log_job,
                cfg,
                params={
                    "ckpt_path": cfg.ckpt_path,
                    "inputs": redacted_inputs(cfg.inputs),  # never a store's credential
                    "output": output.folder,
                    "engine": predictor.engine_name,
                    "ray.address": cfg.ray.address,
                    "actors": scored.actors,
                    "batch_size": settings.batch_size,
                },
                metrics={
                    "images": sum(decisions.values()) + errors,
                    "errors": errors,
                    "already_scored": skipped,
                    "left_out": len(left_out),
                    "images_per_s": scored.images_per_s,
                    "nodes": len(scored.nodes),
                },
                class_counts=decisions,
                started=started,
            )
        run_id = recording.result()
    print(f"MLflow run {run_id} in experiment '{cfg.experiment_name}'")
    return output.folder
