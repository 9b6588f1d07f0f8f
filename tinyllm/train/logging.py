"""Where training metrics go: dvclive in the pipeline, nowhere in tests and benchmarks.

dvclive is imported only when a `LiveLogger` is made, so the library (loop, benchmarks) runs
on machines without it (the GPU machine has no dvc).
"""

from __future__ import annotations

from pathlib import Path


class NullLogger:
    """Drops every metric, so the loop never checks whether logging is on."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class LiveLogger:
    """Writes metrics with dvclive into `directory` (plots as TSV, summary as metrics.json).

    `Live(dvcyaml=False, save_dvc_exp=False)`: our dvc.yaml is hand-written and a stage run by
    hand must not create experiments (dvclive's defaults rewrite dvc.yaml during repro and create
    an experiment per run). Steps are set directly, not with next_step(),
    which slows down as history grows.
    """

    def __init__(self, directory: Path, summary_every: int = 20):
        from dvclive import Live

        self.live = Live(str(directory), dvcyaml=False, save_dvc_exp=False, report=None)
        self.summary_every, self.n_logged = summary_every, 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.n_logged += 1
        if self.n_logged % self.summary_every == 0:
            self.live.make_summary()

    def close(self) -> None:
        self.live.make_summary()
        self.live.end()
