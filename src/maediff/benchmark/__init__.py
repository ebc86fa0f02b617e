"""`maediff benchmark`: the paper's Tables 1 and 2 and Figure 3 as one resumable job.

    from maediff.benchmark import BenchmarkPlan, run_benchmark
    plan = BenchmarkPlan.from_args(table="1", scale="cpu", seeds=[0, 1, 2], minutes=3)
    run_benchmark(plan, Path("bench"))

Each file one job:

    plan.py           which runs (model, fold, seed), each run's configuration and budget
    locks.py          locks between processes filling one folder (flock, or a lock file)
    run.py            one run: train, probe, evaluate, Figure 3's slices, done mark
    status.py         whether a run is finished (status.json), or served by its twin row
    estimate.py       each run's time, measured on this machine (`--list`)
    probe.py          the patch probe of the diffusion models (probe.json)
    orchestration.py  the whole job: data, the runs in turn, then collect
    collect.py        the tables, paired statistics and Figure 3 of the finished runs

The tables, texts and figure are written by reporting/ (benchmark.py, comparison.py).
Above pipeline/ (it evaluates with pipeline/evaluate.py); only cli.py imports it.
"""

from .collect import collect
from .orchestration import run_benchmark
from .plan import BenchmarkPlan, RunSpec

__all__ = ["BenchmarkPlan", "RunSpec", "collect", "run_benchmark"]
