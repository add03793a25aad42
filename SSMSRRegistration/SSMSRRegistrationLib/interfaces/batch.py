"""``ssmsr batch``: the cases of a JOBS.csv (``workflows.batch``) run on Dask (``dask.distributed``).

    >>> from SSMSRRegistrationLib.interfaces.batch import run_batch
    >>> rows = run_batch("JOBS.csv", "results", preset="fast", retries=1)   # also writes results/results.csv

By default an embedded LocalCluster of worker processes on this machine, started and stopped here: one worker per
visible GPU (per ``gpus_per_worker`` GPUs), else one per ``threads_per_worker`` CPU cores. ``scheduler`` attaches to
a running Dask cluster instead (tcp://host:8786 or a scheduler file), e.g. one of dask-jobqueue on SLURM, PBS or SGE.
A worker of the embedded cluster runs one case at a time per GPU it has, or one case on CPUs; with
``gpus_per_worker`` each case asks for one of the Dask resource "GPU". A case computes with ``threads_per_worker``
CPU threads. Dask retries a case whose worker raised an error (``retries``) or died (the
scheduler's allowed-failures); bad input fails at once. Cases whose folder is complete are skipped.

Progress: a tqdm bar over the cases on stderr and a summary on stdout (``bar``), or JSON lines on stdout (``jsonl``):
    batch     {"cases", "to_run", "skipped", "cluster"}
    case      {"case", "status", "seconds", "error", "done", "total"}
    finished  {"outputs": {"results": path}, "metrics": {"cases", "ok", "failed", "skipped", "seconds"}}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..common.errors import InputError, RegistrationCancelled
from ..common.protocol import check_device_name, finished_event
from ..common.run_config import RUN_OPTIONS, RunConfiguration, combined
from ..workflows.batch import (FAILED, OK, RESULTS, SKIPPED, CaseOptions, Job, failed_row, finished_row, read_jobs,
                               remove_staging, run_case, write_results)

try:
    from dask.system import CPU_COUNT
    from distributed import Client, LocalCluster, as_completed, get_worker
    from distributed.core import Status
except ModuleNotFoundError as missing:
    # Dask is the optional `batch` extra. Still a ModuleNotFoundError of the missing module (code that tolerates an
    # absent optional package keeps working) and also an InputError, so that `ssmsr batch` reports this message.
    class BatchExtraMissing(ModuleNotFoundError, InputError):
        """Dask or distributed is not installed."""

    raise BatchExtraMissing(
        f"`ssmsr batch` needs Dask, which is not installed here (no module {(missing.name or 'dask').split('.')[0]!r}):"
        ' install the batch extra, pip install "ssmsr[batch]" (Python 3.10 or newer).', name=missing.name) from missing

#: Seconds to wait for an existing scheduler to answer.
CONNECT_TIMEOUT_S = 30


class BatchInterrupted(RegistrationCancelled):
    """The batch was interrupted (Ctrl-C, SIGTERM); results.csv lists the cases done, a new run does the others."""


@dataclass(frozen=True)
class ClusterPlan:
    """Where the cases run: ``scheduler`` (None: an embedded LocalCluster of ``workers`` processes), the CPU threads
    of a case (None: the worker's cores divided by its GPUs, or by its Dask threads) and the GPUs of a worker (0:
    none)."""

    scheduler: Optional[str]
    workers: int
    threads: Optional[int]
    gpus: int


def plan_cluster(scheduler: Optional[str] = None, workers: Optional[int] = None,
                 threads_per_worker: Optional[int] = None, gpus_per_worker: Optional[int] = None,
                 device: str = "auto") -> ClusterPlan:
    """Size the cluster (see the module docstring), or InputError for options that do not fit this machine."""
    for option, value in (("--workers", workers), ("--threads-per-worker", threads_per_worker),
                          ("--gpus-per-worker", gpus_per_worker)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be at least 1, got {value}" + (
                "; for CPU workers use --device cpu" if option == "--gpus-per-worker" else "."))
    if gpus_per_worker and device == "cpu":
        raise InputError("--gpus-per-worker asks for GPUs but --device is cpu; drop one of them.")
    if scheduler:
        if workers is not None:
            raise InputError("--workers sizes the embedded cluster; with --scheduler the cluster's own workers run "
                             "the cases (start more of them to go faster).")
        return ClusterPlan(scheduler, 0, threads_per_worker, gpus_per_worker or 0)
    visible = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if (gpus_per_worker or device == "cuda") and not visible:
        raise InputError("No CUDA GPU is visible on this machine; run with --device cpu (or auto), without "
                         "--gpus-per-worker.")
    if visible:
        per_worker = gpus_per_worker or 1
        count = workers or max(1, visible // per_worker)
        if count * per_worker > visible:
            raise InputError(f"{count} workers x {per_worker} GPUs need {count * per_worker} GPUs but {visible} are "
                             "visible; lower --workers or --gpus-per-worker.")
        return ClusterPlan(None, count, threads_per_worker or max(1, CPU_COUNT // count), per_worker)
    if device.startswith("cuda:"):  # one named GPU: its cases one after the other unless --workers says otherwise
        workers = workers or 1
    threads = threads_per_worker or (max(1, CPU_COUNT // workers) if workers else 1)
    return ClusterPlan(None, workers or max(1, CPU_COUNT // threads), threads, 0)


def _connect(scheduler: str) -> Client:
    """A client of the scheduler at ``scheduler`` (an address, or a scheduler file written by ``dask scheduler``)."""
    is_file = os.path.isfile(scheduler)
    if not is_file and not re.fullmatch(r"([a-z]+://)?[\w.\-\[\]:]+:\d+", scheduler):
        raise InputError(f"--scheduler {scheduler!r} is neither a scheduler address (tcp://host:8786) nor an "
                         "existing scheduler file (dask scheduler --scheduler-file FILE).")
    try:
        if is_file:
            return Client(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise InputError(f"Could not reach the Dask scheduler {scheduler!r} ({error}); start it first (dask "
                         "scheduler) or check the address.") from None


@contextlib.contextmanager
def _client(plan: ClusterPlan) -> Iterator[Client]:
    """A client of the cluster of ``plan``; an embedded cluster is stopped (its worker processes ended) on exit."""
    if plan.scheduler:
        with _connect(plan.scheduler) as client:
            offered = [info.get("resources", {}).get("GPU", 0) for info in client.scheduler_info()["workers"].values()]
            if plan.gpus and offered and not any(offered):
                raise InputError("--gpus-per-worker: no worker of that cluster offers the resource GPU; start the "
                                 f"workers with --resources GPU={plan.gpus}.")
            yield client
        return
    # OpenMP threads that wait passively leave the cores to the other workers (torch's default spins).
    environment = {"OMP_NUM_THREADS": str(plan.threads),
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with LocalCluster(n_workers=plan.workers, threads_per_worker=max(1, plan.gpus), processes=True,
                      host="127.0.0.1", dashboard_address=None, env=environment,
                      resources={"GPU": plan.gpus} if plan.gpus else None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            yield client


_GPU_LOCK = threading.Lock()
_FREE_GPUS: Dict[int, List[int]] = {}


def _run_on_worker(key: str, job: Job, output: str, options: CaseOptions, threads: Optional[int], gpus: int,
                   embedded: bool) -> Dict[str, Any]:
    """The Dask task ``key``: ``run_case`` with ``threads`` CPU threads and, with ``gpus``, one of the worker's GPUs
    of its own (worker k of an embedded cluster owns GPUs k*gpus..; an attached worker, those it sees). The case
    stops between training steps once the task is cancelled or its worker shuts down."""
    worker = get_worker()
    torch.set_num_threads(threads or max(1, CPU_COUNT // (gpus or worker.state.nthreads)))

    def should_stop() -> bool:
        task = worker.state.tasks.get(key)
        return worker.status not in (Status.running, Status.paused) or task is None or task.state == "cancelled"

    if not gpus:
        return run_case(job, output, options, should_stop)
    first = int(worker.name) * gpus if embedded else 0
    with _GPU_LOCK:
        index = _FREE_GPUS.setdefault(first, list(range(first, first + gpus))).pop(0)
    try:
        return run_case(job, output, replace(options, config=options.config.with_overrides(device=f"cuda:{index}")),
                        should_stop)
    finally:
        with _GPU_LOCK:
            _FREE_GPUS[first].append(index)


class _Progress:
    """Progress over the cases: 'bar' (tqdm on stderr, summary on stdout), 'jsonl' (stdout) or 'none'."""

    def __init__(self, kind: str, total: int, skipped: int, cluster: str):
        self.kind, self.total, self.done, self.bar = kind, total, skipped, None
        self.counts = {OK: 0, FAILED: 0, SKIPPED: skipped}
        if kind == "jsonl":
            self._emit({"event": "batch", "cases": total, "to_run": total - skipped, "skipped": skipped,
                        "cluster": cluster})
        elif kind == "bar":
            from tqdm import tqdm

            print(f"ssmsr batch: {total} cases, {skipped} already done, on {cluster}", file=sys.stderr, flush=True)
            self.bar = tqdm(total=total, initial=skipped, unit="case", file=sys.stderr, dynamic_ncols=True)

    def _emit(self, event: dict) -> None:
        print(json.dumps(event), flush=True)

    def case(self, row: Dict[str, Any]) -> None:
        self.done += 1
        self.counts[row["status"]] += 1
        if self.kind == "jsonl":
            seconds = row.get("seconds")
            self._emit({"event": "case", "case": row["case"], "status": row["status"],
                        "seconds": seconds if seconds is not None and math.isfinite(seconds) else None,
                        "error": row.get("error") or None, "done": self.done, "total": self.total})
        elif self.bar is not None:
            if row["status"] == FAILED:
                self.bar.write(f"ssmsr batch: case {row['case']} failed: {row['error']}", file=sys.stderr)
            self.bar.set_postfix_str(f"{self.counts[OK]} ok, {self.counts[FAILED]} failed", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, rows: List[Dict[str, Any]], results: str, seconds: float) -> None:
        counts = {status: sum(row["status"] == status for row in rows) for status in (OK, FAILED, SKIPPED)}
        if self.kind == "jsonl":
            self._emit(finished_event({"results": results}, {"cases": len(rows), **counts, "seconds": seconds}))
        elif self.kind == "bar":
            print(f"ssmsr batch: {len(rows)} cases in {seconds:.1f} s: {counts[OK]} ok, {counts[FAILED]} failed, "
                  f"{counts[SKIPPED]} skipped (done before); results: {results}", flush=True)
            for row in rows:
                if row["status"] == FAILED:
                    print(f"  failed: {row['case']}: {row['error']}", flush=True)


def _case_options(config: Optional[RunConfiguration], preset: Optional[str], model: Optional[str], top_k: int,
                  options: Dict[str, Any]) -> CaseOptions:
    """The cases' options, checked here so that a bad option fails once, not once per case."""
    configuration = combined(config, preset, **options)
    for kind in ("pair", "cine"):
        configuration.only_for(kind).resolve(kind)
    if model and not os.path.isfile(model):
        raise InputError(f"The model file {model!r} does not exist; check the path.", setting="model")
    if int(top_k) < 1:
        raise InputError(f"{{setting}} must be at least 1, got {top_k}.", setting="top_k")
    return CaseOptions(config=configuration, model=os.path.abspath(model) if model else None, top_k=int(top_k))


def run_batch(jobs_csv: str, output: str, *, workers: Optional[int] = None, scheduler: Optional[str] = None,
              threads_per_worker: Optional[int] = None, gpus_per_worker: Optional[int] = None, retries: int = 1,
              progress: str = "none", config: Optional[RunConfiguration] = None, preset: Optional[str] = None,
              model: Optional[str] = None, top_k: int = 1, **options) -> List[Dict[str, Any]]:
    """Run every case of ``jobs_csv`` into ``output``/CASE on Dask and write ``output``/results.csv.

    ``config``, ``preset``, ``options``: the run configuration (``common.run_config``; each case takes the options of
    its kind, e.g. ``batch_size`` only track cases). ``model``: a model file for register and segment cases;
    ``top_k``: atlases fused by segment cases. ``retries``: extra attempts of a case whose worker raised an error.
    ``progress``: 'bar', 'jsonl' or 'none'. Returns the results rows in the jobs file's order. Raises InputError for a
    bad jobs file or options, BatchInterrupted when interrupted (results.csv then lists the cases done).
    """
    jobs = read_jobs(jobs_csv)
    case_options = _case_options(config, preset, model, top_k, options)
    if retries < 0:
        raise InputError(f"{{setting}} must be 0 or more, got {retries}.", setting="retries")
    device = check_device_name(case_options.config.resolve("pair").device)
    plan = plan_cluster(scheduler, workers, threads_per_worker, gpus_per_worker, device)
    output = os.path.abspath(os.fspath(output))
    os.makedirs(output, exist_ok=True)
    rows = {job.case: row for job in jobs for row in [finished_row(output, job.case)] if row is not None}
    todo = [job for job in jobs if job.case not in rows]
    cluster = plan.scheduler or (f"an embedded cluster of {plan.workers} workers x "
                                 + (f"{plan.gpus} GPU(s), " if plan.gpus else "") + f"{plan.threads} thread(s)")
    reporter = _Progress(progress, len(jobs), len(rows), cluster)
    start = time.perf_counter()
    try:
        if todo:
            _run_on_dask(todo, output, case_options, plan, retries, rows, reporter)
    except (KeyboardInterrupt, RegistrationCancelled) as stop:
        raise BatchInterrupted(f"Batch interrupted: {len(rows)} of {len(jobs)} cases done (listed in "
                               f"{os.path.join(output, RESULTS)}); run the same command again to run the "
                               "others.") from stop
    finally:
        reporter.close()
        ordered = [rows[job.case] for job in jobs if job.case in rows]
        results = write_results(output, ordered)
    reporter.summary(ordered, results, time.perf_counter() - start)
    return ordered


def _run_on_dask(todo: List[Job], output: str, options: CaseOptions, plan: ClusterPlan, retries: int,
                 rows: Dict[str, Dict[str, Any]], reporter: _Progress) -> None:
    """Submit ``todo`` and put each case's row into ``rows`` as it ends; a case that raised even after its
    retries is recorded as failed. Staging folders of killed attempts are removed once none can be running."""
    all_ended = False
    try:
        with _client(plan) as client:
            keys = {job.case: f"ssmsr-{job.case}-{uuid.uuid4().hex[:8]}" for job in todo}
            futures = {client.submit(_run_on_worker, keys[job.case], job, output, options, plan.threads, plan.gpus,
                                     plan.scheduler is None, key=keys[job.case], retries=retries,
                                     resources={"GPU": 1} if plan.gpus else None): job
                       for job in todo}
            try:
                for future in as_completed(futures, loop=client.loop):
                    job = futures[future]
                    try:
                        row = future.result()
                    except Exception as error:  # noqa: BLE001 - whatever a case raised is its failure message
                        row = failed_row(job, f"{type(error).__name__}: {error}")
                    rows[job.case] = row
                    reporter.case(row)
            finally:
                client.cancel(list(futures))
        all_ended = True
    finally:
        if all_ended or plan.scheduler is None:
            remove_staging(output, [job.case for job in todo])


def options_from_args(args) -> Dict[str, Any]:
    """``run_batch`` keyword arguments from the parsed ``ssmsr batch`` command line."""
    return dict(workers=args.workers, scheduler=args.scheduler, threads_per_worker=args.threads_per_worker,
                gpus_per_worker=args.gpus_per_worker, retries=args.retries, progress=args.progress,
                config=RunConfiguration.of(args.preset, **{option.name: getattr(args, option.name, None)
                                                           for option in RUN_OPTIONS}),
                model=args.model, top_k=args.top_k)
