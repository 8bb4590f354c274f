"""`seqhead sweep --ray`: each (configuration, seed) of a sweep is a Ray task with a share of a GPU.

The sweep plans as without Ray (finished runs are reused, so a rerun resumes); the runs still to train go to the
cluster, and each writes its run folder as it would locally, so OUT must be on storage every node sees. A task whose
process dies (node lost, out of memory) is retried by Ray; an error of the run itself (bad options, data) ends the
sweep with that error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from .train import TrainOptions


@dataclass(frozen=True)
class RaySweep:
    address: str | None = None  # the cluster to join; None = RAY_ADDRESS when set, else a local cluster for the sweep
    # GPU share of each run: several small heads train side by side on one GPU. None = 0.25 when the cluster has
    # GPUs, else 0 (CPU runs).
    gpus_per_run: float | None = None
    cpus_per_run: float = 1.0  # CPUs each run reserves (its torch threads are the configuration's --threads)

    def __post_init__(self):
        from affextract.cluster import require_ray

        require_ray()
        if self.cpus_per_run <= 0 or (self.gpus_per_run is not None and self.gpus_per_run < 0):
            raise ValueError("RaySweep: cpus_per_run must be > 0 and gpus_per_run >= 0")


def run_on_ray(train: Callable[[TrainOptions], dict], runs: list[TrainOptions], options: RaySweep
               ) -> Iterator[tuple[int, dict]]:
    """(position in `runs`, train(run)) of each run, as the runs finish; `train` is the sweep's function that trains
    one run (it runs in the cluster's worker processes)."""
    from affextract.cluster import connect, import_ray

    ray = import_ray()
    started = connect(ray, options.address)
    try:
        gpus = options.gpus_per_run
        if gpus is None:
            gpus = 0.25 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        task = ray.remote(num_cpus=options.cpus_per_run, num_gpus=gpus, max_retries=2)(train)
        pending = {task.remote(o): i for i, o in enumerate(runs)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    yield i, ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:  # the run's own error, as a local sweep would raise it
                    raise e.as_instanceof_cause() from None
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
