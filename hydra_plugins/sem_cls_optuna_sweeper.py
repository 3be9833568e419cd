"""Hydra's Optuna sweeper with a study that can be resumed from its SQLite storage.

Three changes to hydra-optuna-sweeper 1.3.0 (which needs optuna < 3): optuna 2.10's SQL storage
works with SQLAlchemy 2, which MLflow needs; `n_trials` counts the study's finished trials,
so running a killed sweep's command again runs only the trials it has not finished; and each
job's folder is its trial number in the study, so searches sharing a study never collide.
The first and the last patch private methods, through sem_cls/compat.py. Hydra loads
sweepers from the hydra_plugins package only, hence this folder; it scans every module here at
each start, so optuna is imported only when a sweep begins.
"""

import logging

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from sem_cls.compat import commit_optuna_schema_stamp, rewrite_trial_overrides

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """OptunaSweeper, resumable (see above); `n_jobs`, the trials launched together, takes
    joblib's meaning, so -1 is every core."""

    def sweep(self, arguments: list[str]) -> None:
        import joblib

        commit_optuna_schema_stamp()
        impl = self.sweeper
        impl.n_jobs = joblib.effective_n_jobs(impl.n_jobs)
        if impl.storage and impl.study_name:
            finished, started = stored_trials(impl.storage, impl.study_name)
            if started:
                log.info(
                    "Study %s in %s has %d of %d trials finished; running the rest. A new "
                    "search needs another hydra.sweeper.study_name.",
                    impl.study_name, impl.storage, finished, impl.n_trials,
                )  # fmt: skip
                # Job numbers go on from the study's trial numbers, and the seeded sampler
                # must not replay the random start it already tried.
                impl.job_idx = started
                if hasattr(impl.sampler, "reseed_rng"):  # the grid sampler is built later
                    impl.sampler.reseed_rng()
            impl.n_trials = max(impl.n_trials - finished, 0)
        number_jobs_by_trial(impl)
        return super().sweep(arguments)


def number_jobs_by_trial(impl) -> None:
    """Each trial's job gets its folder named by the trial's number in the study
    (hydra.sweep.subdir), which sem_cls.tracking also tags as `sweep_job`. Hydra numbers jobs
    per process, so two searches on one study would each have a job 1, holding other trials."""

    def numbered(trials, overrides):
        return [
            [*trial_overrides, f"hydra.sweep.subdir={trial.number}"]
            for trial, trial_overrides in zip(trials, overrides, strict=True)
        ]

    rewrite_trial_overrides(impl, numbered)


def stored_trials(storage: str, study_name: str) -> tuple[int, int]:
    """Finished (completed or pruned) and all trials of a stored study; (0, 0) if it is new."""
    import optuna

    if study_name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return 0, 0
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in finished for t in trials), len(trials)
