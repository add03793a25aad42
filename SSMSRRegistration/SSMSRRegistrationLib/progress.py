"""Progress reporting for the command line: a terminal bar, JSON lines (the worker protocol), or nothing.

JSON-lines protocol (stdout, one object per line, flushed):
    {"event": "started", "device": "cpu", "scales": ["1/2", "1"], "steps_per_scale": N, "image_size": [x, y, z],
     "pairs": 1}
    {"event": "progress", "scale": "1/2", "scale_index": 0, "num_scales": 2, "step": k, "steps": N,
     "loss": -0.41, "fraction": 0.25, "elapsed_s": 3.2, "eta_s": 9.6}
    {"event": "finished", "outputs": {"field": ..., "warped": ... or null, ...}, "metrics": {...}}
    {"event": "error", "message": "...", "kind": "input" | "cancelled" | "out_of_memory" | "internal"}
"""

from __future__ import annotations

import json
import math
import sys
from typing import Optional, TextIO


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


class Reporter:
    """Silent reporter; the base of the others."""

    def handle(self, event: dict) -> None:
        """Receive an engine event ("started" or "progress")."""

    def finished(self, outputs: dict, metrics: dict) -> None:
        pass

    def error(self, message: str, kind: str) -> None:
        print(f"ssmsr: error: {message}", file=sys.stderr, flush=True)


class JsonLinesReporter(Reporter):
    """One JSON object per line on ``stream`` (stdout by default)."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout

    def _emit(self, event: dict) -> None:
        self.stream.write(json.dumps(_json_safe(event)) + "\n")
        self.stream.flush()

    def handle(self, event: dict) -> None:
        self._emit(event)

    def finished(self, outputs: dict, metrics: dict) -> None:
        self._emit({"event": "finished", "outputs": outputs, "metrics": metrics})

    def error(self, message: str, kind: str) -> None:
        self._emit({"event": "error", "message": message, "kind": kind})
        super().error(message, kind)


class BarReporter(Reporter):
    """A tqdm bar on stderr over all steps of all scales, showing scale, step, loss and time left."""

    def __init__(self):
        self.bar = None

    def handle(self, event: dict) -> None:
        if event["event"] == "started":
            self._start(event)
        elif event["event"] == "progress" and self.bar is not None:
            self._advance(event)

    def _start(self, info: dict) -> None:
        from tqdm import tqdm

        total = info.get("steps_per_scale", 0) * len(info.get("scales", [])) or None
        print(f"ssmsr: registering on {info.get('device')} "
              f"({', '.join(map(str, info.get('image_size', [])))} voxels), scales {','.join(info.get('scales', []))}",
              file=sys.stderr, flush=True)
        self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    def _advance(self, event: dict) -> None:
        done = event["scale_index"] * event["steps"] + event["step"]
        self.bar.set_description_str(f"scale {event['scale']} ({event['scale_index'] + 1}/{event['num_scales']}) "
                                     f"step {event['step']}/{event['steps']}", refresh=False)
        self.bar.set_postfix_str(f"loss {event['loss']:.4f}", refresh=False)
        self.bar.update(done - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finished(self, outputs: dict, metrics: dict) -> None:
        self._close()
        written = ", ".join(f"{key} -> {path}" for key, path in outputs.items() if path)
        print(f"ssmsr: done in {metrics.get('seconds', 0):.1f} s; local NCC {metrics.get('ncc_before', 0):.3f} -> "
              f"{metrics.get('ncc_after', 0):.3f}; {written}", file=sys.stderr, flush=True)

    def error(self, message: str, kind: str) -> None:
        self._close()
        super().error(message, kind)


def make_reporter(kind: str) -> Reporter:
    """'bar', 'jsonl' or 'none'."""
    return {"bar": BarReporter, "jsonl": JsonLinesReporter, "none": Reporter}[kind]()
