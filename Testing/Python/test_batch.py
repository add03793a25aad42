"""``ssmsr batch`` on real Dask clusters (an embedded LocalCluster of worker processes, a scheduler and a worker
started as separate processes, a worker killed mid-case, an interrupted command) with real brain slices (ICBM152
T1 and its tissue labels) and a short schedule; plus the checks of bad jobs files."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import torch
from distributed import Client, LocalCluster

from SSMSRRegistrationLib.common.errors import InputError
from SSMSRRegistrationLib.imaging import sample_data
from SSMSRRegistrationLib.interfaces import cli
from SSMSRRegistrationLib.interfaces.batch import ClusterPlan, plan_cluster, run_batch
from SSMSRRegistrationLib.workflows.batch import read_jobs
from SSMSRRegistrationLib.workflows.register import register
from SSMSRRegistrationLib.workflows.segment import segment
from SSMSRRegistrationLib.workflows.track import track

MODULE_DIRECTORY = str(Path(__file__).resolve().parents[2] / "SSMSRRegistration")
ENV = dict(os.environ, PYTHONPATH=MODULE_DIRECTORY + os.pathsep + os.environ.get("PYTHONPATH", ""))
SHORT = dict(device="cpu", scales="1/2,1", steps=5, precision="float32", seed=0)
SLICES = (95, 99, 103)
HEADER = "case,kind,fixed,moving,moving_labels,fixed_labels,target,atlases,cine,landmarks,reference\n"
REGISTER_ROWS = ("r1,register,s95.nii.gz,s99.nii.gz,l99.nii.gz,l95.nii.gz,,,,,\n"
                 "r2,register,s99.nii.gz,s103.nii.gz,,,,,,,\n")
#: The tracking case registers this frame of the cine onto the others.
REFERENCE_FRAME = 1
#: Two landmarks (LPS mm) in each frame of the cohort's cine: {label: (frames, 2)}.
LANDMARKS = {"a": np.array([[60.0, 60.0], [62.0, 61.0], [63.0, 64.0]]),
             "b": np.array([[100.0, 80.0], [101.0, 83.0], [99.0, 85.0]])}


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((4.0, 4.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Axial slices of the ICBM152 T1 (48x44 pixels at 4 mm) with their tissue labels, a 3-frame cine, and jobs.csv
    with two register cases (one with Dice), a segment case, a track case and a case whose moving image is missing."""
    folder = tmp_path_factory.mktemp("cohort")
    volume = sitk.GetArrayFromImage(sample_data.brain_t1())
    labels = sitk.GetArrayFromImage(sample_data.brain_tissue_labels())
    crop = (slice(20, 212, 4), slice(10, 186, 4))
    for z in SLICES:
        _write(volume[(z,) + crop].astype(np.float32), folder / f"s{z}.nii.gz")
        _write(labels[(z,) + crop].astype(np.uint8), folder / f"l{z}.nii.gz")
    cine = sitk.JoinSeries([sitk.GetImageFromArray(volume[(z,) + crop].astype(np.float32)) for z in (95, 97, 99)])
    cine.SetSpacing((4.0, 4.0, 1.0))
    sitk.WriteImage(cine, str(folder / "cine.nii.gz"))
    (folder / "jobs.csv").write_text(
        HEADER + REGISTER_ROWS
        + "seg,segment,,,,l95.nii.gz,s95.nii.gz,s99.nii.gz:l99.nii.gz;s103.nii.gz:l103.nii.gz,,,\n"
        + f"trk,track,,,,,,,cine.nii.gz,landmarks.csv,{REFERENCE_FRAME}\n"
        + "bad,register,s95.nii.gz,missing.nii.gz,,,,,,,\n")
    (folder / "landmarks.csv").write_text("frame,label,L,P\n" + "".join(
        f"{frame},{label},{x},{y}\n" for label, points in LANDMARKS.items() for frame, (x, y) in enumerate(points)))
    (folder / "register.csv").write_text(HEADER + REGISTER_ROWS)
    return folder


@pytest.fixture(scope="module")
def alone(cohort):
    """Each case of jobs.csv run alone in this process (one CPU thread, as a batch worker): its main output array."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = lambda name: str(cohort / name)  # noqa: E731
        outputs = {case: sitk.GetArrayFromImage(register(path(f"s{fixed}.nii.gz"), path(f"s{moving}.nii.gz"),
                                                         **SHORT).field)
                   for case, fixed, moving in (("r1", 95, 99), ("r2", 99, 103))}
        atlases = [(path(f"s{z}.nii.gz"), path(f"l{z}.nii.gz")) for z in (99, 103)]
        outputs["seg"] = sitk.GetArrayFromImage(segment(path("s95.nii.gz"), atlases, **SHORT).labels)
        outputs["trk"] = sitk.GetArrayFromImage(track(path("cine.nii.gz"), reference=REFERENCE_FRAME,
                                                      **SHORT).stacked_field())
    finally:
        torch.set_num_threads(threads)
    return outputs


def _read_results(output: Path) -> dict:
    with open(output / "results.csv", newline="", encoding="utf-8") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


def _main_output(output: Path, case: str) -> np.ndarray:
    name = {"seg": "labels.nii.gz", "trk": "fields.nii.gz"}.get(case, "field.nii.gz")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output / case / name)))


def _assert_nothing_partial(output: Path) -> None:
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]
    for folder in (path for path in output.iterdir() if path.is_dir()):
        assert (folder / "case.json").is_file(), folder


@pytest.fixture(scope="module")
def embedded_batch(cohort, tmp_path_factory):
    output = tmp_path_factory.mktemp("embedded") / "out"
    rows = run_batch(str(cohort / "jobs.csv"), str(output), workers=2, threads_per_worker=1, **SHORT)
    return output, rows


def test_an_embedded_cluster_of_two_workers_gives_what_each_case_gives_alone(embedded_batch, alone, cohort):
    output, rows = embedded_batch
    assert [(row["case"], row["status"]) for row in rows] == [("r1", "ok"), ("r2", "ok"), ("seg", "ok"),
                                                               ("trk", "ok"), ("bad", "failed")]
    for case, expected in alone.items():
        np.testing.assert_array_equal(_main_output(output, case), expected, err_msg=case)
    pids = {json.loads((output / case / "case.json").read_text())["pid"] for case in alone}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes shared the cases
    table = _read_results(output)
    for case in alone:
        assert table[case]["device"] == "cpu" and float(table[case]["ncc_after"]) > float(table[case]["ncc_before"])
        assert float(table[case]["seconds"]) > 0 and table[case]["folded_percent"] != ""
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "l95.nii.gz")))
    warped_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "r1" / "warped_labels.nii.gz")))
    for label in (1, 2):
        a, b = fixed_labels == label, warped_labels == label
        assert float(table["r1"][f"dice_{label}"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-5)
    assert float(table["r1"]["dice_mean"]) > 0.5 and float(table["seg"]["dice_mean"]) > 0.5
    assert table["r2"]["dice_mean"] == "" and table["trk"]["dice_1"] == ""
    # The tracking case's landmarks: the error without registration is the mean distance between the points of the
    # reference frame and of each other frame.
    points = np.stack(list(LANDMARKS.values()))  # (label, frame, 2)
    before = np.mean([np.linalg.norm(points[:, fixed] - points[:, REFERENCE_FRAME], axis=1).mean()
                      for fixed in (0, 2)])
    assert float(table["trk"]["tre_before_mm"]) == pytest.approx(before, rel=1e-5)
    assert float(table["trk"]["tre_after_mm"]) >= 0 and table["r1"]["tre_before_mm"] == ""
    _assert_nothing_partial(output)


def test_a_case_with_a_missing_input_fails_alone_with_its_message(embedded_batch):
    output, rows = embedded_batch
    table = _read_results(output)
    assert table["bad"]["status"] == "failed"
    assert "missing.nii.gz' does not exist; check the path" in table["bad"]["error"]
    assert "line 6 of the jobs file" in table["bad"]["error"]
    assert not (output / "bad").exists()
    assert all(table[case]["status"] == "ok" and table[case]["error"] == "" for case in ("r1", "r2", "seg", "trk"))


def test_a_worker_killed_in_the_middle_of_a_case_loses_nothing(cohort, tmp_path):
    output = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster, set_as_default=False) as client:
        with ThreadPoolExecutor(1) as pool:
            batch = pool.submit(run_batch, str(cohort / "register.csv"), str(output),
                                scheduler=cluster.scheduler_address, threads_per_worker=1, **dict(SHORT, steps=30))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = [address for address, keys in client.processing().items()
                           if any(str(key).startswith("ssmsr-r1-") for key in keys)]
                if running and list(output.glob(".r1.partial-*")):
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"case r1 did not start on a worker: {batch.exception() if batch.done() else ''}")
            pid = client.run(os.getpid, workers=running)[running[0]]
            time.sleep(0.5)  # into the case
            assert list(output.glob(".r1.partial-*")) and not (output / "r1").exists()
            os.kill(pid, signal.SIGKILL)
            rows = batch.result(timeout=300)
    assert [(row["case"], row["status"]) for row in rows] == [("r1", "ok"), ("r2", "ok")]
    assert json.loads((output / "r1" / "case.json").read_text())["pid"] != pid
    assert set(_read_results(output)) == {"r1", "r2"}
    _assert_nothing_partial(output)


def _batch_command(jobs: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "SSMSRRegistrationLib", "batch", str(jobs), "-o", str(output),
                             "--workers", "1", "--threads-per-worker", "1", "--device", "cpu", "--scales", "1/2,1",
                             "--precision", "float32", "--progress", "jsonl", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the child: SIGINT as in a terminal. A test run started in the background of a non-interactive shell
    (``bash .ci/run &``) ignores SIGINT, and children inherit that: Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_command_runs_only_the_unfinished_cases_again(cohort, tmp_path):
    jobs, output = tmp_path / "jobs.csv", tmp_path / "out"
    jobs.write_text("case,kind,fixed,moving\n"
                    + "".join(f"c{index},register,{cohort}/s{fixed}.nii.gz,{cohort}/s{moving}.nii.gz\n"
                              for index, (fixed, moving) in enumerate(((95, 99), (99, 103), (103, 95)))))
    first = _batch_command(jobs, output, "--steps", "40")
    for line in first.stdout:
        if json.loads(line)["event"] == "case":
            break
    children = psutil.Process(first.pid).children(recursive=True)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert json.loads(stdout.splitlines()[-1])["kind"] == "cancelled"
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive  # the embedded cluster's processes ended with the command
    assert {case: row["status"] for case, row in _read_results(output).items()} == {"c0": "ok"}
    assert sorted(path.name for path in output.iterdir()) == ["c0", "results.csv"]

    second = _batch_command(jobs, output, "--steps", "40")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[0]["event"] == "batch" and (events[0]["skipped"], events[0]["to_run"]) == (1, 2)
    assert sorted(event["case"] for event in events if event["event"] == "case") == ["c1", "c2"]
    assert events[-1]["event"] == "finished" and events[-1]["metrics"]["ok"] == 2
    table = _read_results(output)
    assert {case: row["status"] for case, row in table.items()} == {"c0": "skipped", "c1": "ok", "c2": "ok"}
    assert float(table["c0"]["ncc_after"]) > 0
    _assert_nothing_partial(output)


def test_an_attached_scheduler_gives_the_same_results(cohort, alone, tmp_path):
    scheduler_file, output = tmp_path / "scheduler.json", tmp_path / "out"
    dask = [sys.executable, "-m", "dask"]
    processes = []
    with open(tmp_path / "dask.log", "w") as log:
        try:
            processes.append(subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                                      "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                              stdout=log, stderr=log, env=ENV))
            processes.append(subprocess.Popen(dask + ["worker", "--scheduler-file", str(scheduler_file),
                                                      "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                                                      "--no-dashboard"], stdout=log, stderr=log, env=ENV))
            with Client(scheduler_file=str(scheduler_file), timeout=60, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=60)
                assert client.scheduler_info()["address"].startswith("tcp://127.0.0.1:")
            rows = run_batch(str(cohort / "register.csv"), str(output), scheduler=str(scheduler_file),
                             threads_per_worker=1, **SHORT)
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    assert [(row["case"], row["status"]) for row in rows] == [("r1", "ok"), ("r2", "ok")]
    for case in ("r1", "r2"):
        np.testing.assert_array_equal(_main_output(output, case), alone[case], err_msg=case)
    _assert_nothing_partial(output)


@pytest.mark.parametrize("content, message", [
    ("case,fixed,moving\nr,a.nii,b.nii\n", "needs the columns case and kind"),
    ("case,kind,fixd,moving\nr,register,a.nii,b.nii\n", "(unknown: fixd)"),
    ("case,kind,fixed,moving\nr,regster,a.nii,b.nii\n", "unknown kind 'regster'; use one of register, segment, track"),
    ("case,kind,fixed,moving\nr,register,a.nii,\n", "line 2: case r: the column 'moving' is empty"),
    ("case,kind,fixed,moving\n# a comment\n\nr,register,a.nii,b.nii\nr,register,c.nii,d.nii\n", "line 5: the case 'r' "
                                                                                                   "appears twice"),
    ("case,kind,fixed,moving\n../r,register,a.nii,b.nii\n", "is not a usable folder name"),
    ("case,kind,fixed,moving,cine\nr,register,a.nii,b.nii,c.nii\n", "does not use the column 'cine'"),
    ("case,kind,target,atlases\ns,segment,t.nii,a.nii\n", "write the atlases as IMAGE:LABELS;IMAGE:LABELS"),
    ("case,kind,fixed,moving,fixed_labels\nr,register,a.nii,b.nii,l.nii\n", "fixed_labels (for Dice) needs "
                                                                            "moving_labels"),
    ("case,kind,fixed,moving\nr,register,a.nii\n", "3 fields, but the header has 4"),
    ("case,kind,fixed,moving\n", "holds no case"),
    ("case,kind,fixed,moving,reference\nr,register,a.nii,b.nii,1\n", "the reference '1' is not usable"),
    ("case,kind,cine,reference\nt,track,c.nii,end-exhale\n", "reference frame as a number from 0"),
])
def test_a_bad_jobs_file_is_refused_before_anything_runs_with_what_to_fix(tmp_path, content, message, capsys):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(content)
    with pytest.raises(InputError) as raised:
        read_jobs(str(jobs))
    assert message in str(raised.value)
    assert cli.main(["batch", str(jobs), "-o", str(tmp_path / "out"), "--progress", "none"]) == cli.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_jobs_paths_are_relative_to_the_jobs_file_and_atlases_are_pairs(tmp_path):
    (tmp_path / "sub").mkdir()
    jobs = tmp_path / "sub" / "jobs.csv"
    jobs.write_text("case,kind,target,atlases,cine,mask\ns1,segment,t.nii,a.nii:al.nii;../b.nii:bl.nii,,\n"
                    "t1,track,,,c.dcm,\n")
    segment_job, track_job = read_jobs(str(jobs))
    folder = str(tmp_path / "sub")
    assert segment_job.inputs == {"target": os.path.join(folder, "t.nii"),
                                  "atlases": ((os.path.join(folder, "a.nii"), os.path.join(folder, "al.nii")),
                                              (str(tmp_path / "b.nii"), os.path.join(folder, "bl.nii")))}
    assert (track_job.kind, track_job.inputs, track_job.line) == ("track", {"cine": os.path.join(folder, "c.dcm")}, 3)


def test_the_embedded_cluster_is_sized_to_the_machine_and_impossible_sizes_are_refused(monkeypatch):
    from dask.system import CPU_COUNT

    assert plan_cluster(device="cpu") == ClusterPlan(None, CPU_COUNT, 1, 0)
    assert plan_cluster(workers=1, device="cpu") == ClusterPlan(None, 1, CPU_COUNT, 0)
    assert plan_cluster("tcp://127.0.0.1:8786", threads_per_worker=2) == ClusterPlan("tcp://127.0.0.1:8786", 0, 2, 0)
    for options, message in (({"scheduler": "tcp://127.0.0.1:8786", "workers": 2}, "--workers sizes the embedded"),
                             ({"gpus_per_worker": 1, "device": "cpu"}, "--device is cpu"),
                             ({"workers": 0}, "--workers must be at least 1")):
        with pytest.raises(InputError, match=message):
            plan_cluster(**options)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # sizing only: no GPU is used
    assert plan_cluster(gpus_per_worker=2) == ClusterPlan(None, 2, max(1, CPU_COUNT // 2), 2)
    assert plan_cluster(device="cpu").gpus == 0
    with pytest.raises(InputError, match="3 workers x 2 GPUs need 6 GPUs but 4 are visible"):
        plan_cluster(workers=3, gpus_per_worker=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InputError, match="No CUDA GPU is visible"):
        plan_cluster(gpus_per_worker=1)
