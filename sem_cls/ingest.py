"""Check a data folder and write its split, without training: the command line of
sem_cls.data.ingest, with the config Hydra composes and checks before anything heavy loads.

python -m sem_cls.ingest                        # the folder training would use, and its split
python -m sem_cls.ingest data.data_dir=/my/sem  # any <Class>/ folder
"""

import os
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sem_cls.errors import exits_on_user_error, run_command

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="ingest")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    # Hydra composed cfg and checked it (sem_cls.config.schema.ConfigCheck) before this runs.
    from sem_cls.data.ingest import ingest_folder, write_data_files

    ingested = ingest_folder(cfg.data)  # a missing folder refused before torch loads
    from sem_cls.data.manifest import SplitManifest  # torch, for its datasets

    manifest = SplitManifest.from_config(cfg.data, ingested)
    folder = write_data_files(Path(cfg.paths.output_dir) / "data", manifest, ingested)
    counts = Counter(row["split"] for row in manifest.rows)
    print(
        f"Split of {len(manifest.class_names)} classes: "
        + ", ".join(f"{name} {counts[name]:,}" for name in ("train", "val", "test"))
        + f"\nSplit fingerprint {manifest.fingerprint()}"
        + f"\nManifest and ingest report: {folder}"
    )


if __name__ == "__main__":
    run_command(main)
