"""Stand-in for the registration worker, for failure and cancel tests only (never for a successful registration).

Usage: ``python fake_worker.py MODE job JOB.json`` (the arguments after MODE are the real worker's: the job file the
Slicer logic writes, whose "arguments" hold the output path) or ``python fake_worker.py MODE register FIXED MOVING -o
FIELD ...``. Modes:
  crash        report start and one step, print to stderr, then die from SIGSEGV (exit code 139 on Windows)
  error        report an error event and exit with code 1
  no-result    exit with code 0 without reporting anything
  bad-field    write a file that is not a displacement field to FIELD and report success
  stubborn     start a grandchild process, report its id on stderr, ignore SIGTERM and keep reporting progress
"""

import json
import os
import signal
import subprocess
import sys
import time


def emit(event):
    print(json.dumps(event), flush=True)


def progress(step):
    emit({"event": "progress", "scale": "1", "scale_index": 0, "num_scales": 1, "step": step, "steps": 1000,
          "loss": -0.1, "fraction": step / 1000, "elapsed_s": 0.1 * step, "eta_s": 100.0})


def main():
    mode, arguments = sys.argv[1], sys.argv[2:]
    if arguments[0] == "job":
        with open(arguments[1], encoding="utf-8") as stream:
            fieldPath = json.load(stream)["arguments"]["output"]
    else:
        fieldPath = arguments[arguments.index("-o") + 1]
    emit({"event": "started", "device": "cpu", "scales": ["1"], "steps_per_scale": 1000})
    if mode == "crash":
        progress(1)
        print("fake worker: about to crash in the network", file=sys.stderr, flush=True)
        if os.name == "nt":
            os._exit(139)
        os.kill(os.getpid(), signal.SIGSEGV)
    elif mode == "error":
        emit({"event": "error", "message": "The fixed image is constant; there is nothing to register.", "kind": "input"})
        sys.exit(1)
    elif mode == "no-result":
        sys.exit(0)
    elif mode == "bad-field":
        with open(fieldPath, "w", encoding="ascii") as fieldFile:
            fieldFile.write("this is not an image\n")
        emit({"event": "finished", "outputs": {"field": fieldPath, "warped": None, "warped_labels": None}, "metrics": {}})
        sys.exit(0)
    elif mode == "stubborn":
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"grandchild {grandchild.pid}", file=sys.stderr, flush=True)
        if os.name != "nt":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for step in range(1, 6000):
            progress(step)
            time.sleep(0.1)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
