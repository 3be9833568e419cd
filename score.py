"""Classify a whole archive of SEM images on a Ray cluster into Parquet shards, resumably, with
the rows predict would write (sem_cls/score.py, sem_cls/scoring.py; docs/scale-out.md).

python score.py ckpt_path=models:/sem-cls@champion inputs=/archive output=/results/archive-scores
python score.py ckpt_path=<.ckpt> 'inputs=/archive/**/*.tif' output=... ray.address=auto
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

# Only Hydra at the top: a refused command line answers before Ray or torch is imported.
import hydra  # noqa: E402

from sem_cls.errors import exits_on_user_error, run_command  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
@exits_on_user_error
def main(cfg) -> None:
    from sem_cls.score import score

    score(cfg)


if __name__ == "__main__":
    run_command(main)
