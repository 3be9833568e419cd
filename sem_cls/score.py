"""What `python score.py` does: classify a whole archive on Ray (sem_cls.scoring) into Parquet
shards, with the rows predict would write, and record the job as an MLflow run.

Run again with the same output, it scores only the files not yet scored (same path, size and
modification time). Settings are checked before Ray or torch is imported.
"""

import logging
import time
from collections import Counter
from pathlib import Path

from sem_cls.config.predictor import UNCERTAIN, UNKNOWN, PredictorSettings
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sem_cls.tracking import ensure_experiment, store_lock, tracking_client

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
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar(names, table["images"])
    axes.set_ylabel("images")
    axes.set_title("Images per class")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    client.log_figure(run_id, figure, "class_counts.png")
    plt.close(figure)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def score(cfg) -> Path:
    """Score every image of cfg.inputs not yet in cfg.output with the model of cfg.ckpt_path."""
    settings = PredictorSettings.from_config(cfg)  # before anything heavy is imported
    check_ray_config(cfg.ray)
    if not isinstance(cfg.shard_rows, int) or cfg.shard_rows < 1:
        raise UserError(f"shard_rows={cfg.shard_rows} must be a whole number of 1 or more.")
    started = time.time()
    from sem_cls.archive_inputs import list_inputs, redacted_inputs
    from sem_cls.scoring import ScoreOutput, check_address, run_scoring

    output = ScoreOutput(Path(cfg.output))
    output.check()  # each refusal before the work, so it costs nothing
    if cfg.ray.address is not None:
        check_address(str(cfg.ray.address))
    files, left_out, stores = list_inputs(cfg.inputs)  # a store that does not answer stops it
    from sem_cls.predictor import Predictor

    # Loaded here once: a missing model stops the run before any Ray starts; the actors get
    # this model through Ray's object store, so no node needs the tracking store.
    # The driver converts the backbone once into engine_dir; actors on this machine (or on a
    # shared engine_dir) load that conversion instead of converting again.
    predictor = Predictor.load(
        str(cfg.ckpt_path),
        settings,
        tracking_uri=cfg.get("tracking_uri"),
        cache_dir=cfg.paths.engine_dir,
        with_backbone=True,  # a node without that conversion converts its own
    )
    lock = output.open({"written_by": "python score.py", "format": 1})
    try:
        done = output.scored()
        todo = [f for f in files if f.key not in done]
        skipped = len(files) - len(todo)
        log.info("%d files; %d already scored in %s", len(files), skipped, output.folder)
        decisions, errors, rate, facts = Counter(), 0, 0.0, {"actors": 0, "nodes": {}}
        if todo:
            decisions, errors, rate, facts = run_scoring(
                todo,
                stores,
                output,
                predictor,
                str(cfg.ckpt_path),
                cfg.ray,
                cfg.shard_rows,
                engine_dir=str(cfg.paths.engine_dir),
            )
        total_rows = len(output.scored())
    finally:
        lock.release()
    print(f"{summary(decisions, errors, total_rows, skipped)}\nScores: {output.folder}")
    for path in left_out[:20]:
        log.warning("Left out (not an image file by its suffix): %s", path)
    run_id = log_job(
        cfg,
        params={
            "ckpt_path": cfg.ckpt_path,
            "inputs": redacted_inputs(cfg.inputs),  # never a credential of a store's URI
            "output": output.folder,
            "engine": predictor.engine_name,
            "ray.address": cfg.ray.address,
            "actors": facts["actors"],
            "batch_size": settings.batch_size,
        },
        metrics={
            "images": sum(decisions.values()) + errors,
            "errors": errors,
            "already_scored": skipped,
            "left_out": len(left_out),
            "images_per_s": rate,
            "nodes": len(facts["nodes"]),
        },
        class_counts=decisions,
        started=started,
    )
    print(f"MLflow run {run_id} in experiment '{cfg.experiment_name}'")
    return output.folder
