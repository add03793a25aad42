"""Progress reporting for the command line: a terminal bar, JSON lines (the worker protocol of
``common.protocol``), or nothing."""

from __future__ import annotations

import json
import sys
from typing import Optional, TextIO

from ..common.protocol import (ATLAS, PROGRESS, STARTED, VALIDATION, batch_text, error_event, finished_event,
                               half_field_text, json_safe, scale_steps, steps_text)


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
        self.stream.write(json.dumps(json_safe(event)) + "\n")
        self.stream.flush()

    def handle(self, event: dict) -> None:
        self._emit(event)

    def finished(self, outputs: dict, metrics: dict) -> None:
        self._emit(finished_event(outputs, metrics))

    def error(self, message: str, kind: str) -> None:
        self._emit(error_event(message, kind))
        super().error(message, kind)


class BarReporter(Reporter):
    """A tqdm bar on stderr over all steps of all scales, showing scale, step, loss and time left."""

    def __init__(self):
        self.bar = None
        self.validation_loss = None

    def handle(self, event: dict) -> None:
        if event["event"] == STARTED:
            self._start(event)
        elif event["event"] == PROGRESS and self.bar is not None:
            self._advance(event)
        elif event["event"] == VALIDATION:
            self.validation_loss = event["loss"]
            self._write(f"ssmsr: validation loss at scale {event['scale']}, step {event['step']}: {event['loss']:.4f}")
        elif event["event"] == ATLAS:
            self._close()
            print(f"ssmsr: registering atlas {event['index'] + 1} of {event['count']} (rank {event['rank']}, "
                  f"NLCC {event['nlcc']:.4f}): {event['atlas']}", file=sys.stderr, flush=True)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _start(self, info: dict) -> None:
        from tqdm import tqdm

        self._close()
        self.validation_loss = None
        total = sum(scale_steps(info)) or None
        size = ", ".join(map(str, info.get("image_size", [])))
        if "validation_pairs" in info:
            print(f"ssmsr: training on {info.get('device')}: {info.get('pairs')} pairs "
                  f"({info.get('validation_pairs')} for validation), batch {info.get('batch_size')}, first image "
                  f"{size} voxels, scales {','.join(info.get('scales', []))}", file=sys.stderr, flush=True)
        else:
            pairs = f"{info.get('pairs')} pairs, {batch_text(info)}, " if (info.get("pairs") or 1) > 1 else ""
            print(f"ssmsr: registering on {info.get('device')} ({pairs}{size} voxels), scales "
                  f"{','.join(info.get('scales', []))}, {steps_text(info)}, "
                  f"{info.get('precision', 'float32')} precision{half_field_text(info)}", file=sys.stderr, flush=True)
        if info.get("plan"):
            print(f"ssmsr: {info['plan']}", file=sys.stderr, flush=True)
        self.bar = tqdm(total=total, initial=int(info.get("resumed_at") or 0), unit="step", file=sys.stderr,
                        dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                       "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    def _advance(self, event: dict) -> None:
        done = int(round(event["fraction"] * (self.bar.total or 0)))
        self.bar.set_description_str(f"scale {event['scale']} ({event['scale_index'] + 1}/{event['num_scales']}) "
                                     f"step {event['step']}/{event['steps']}", refresh=False)
        postfix = f"loss {event['loss']:.4f}"
        if self.validation_loss is not None:
            postfix += f", validation {self.validation_loss:.4f}"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finished(self, outputs: dict, metrics: dict) -> None:
        self._close()
        written = ", ".join(f"{key} -> {path}" for key, path in outputs.items() if path)
        if "ranking" in metrics:
            print(f"ssmsr: done in {metrics.get('seconds', 0):.1f} s; {len(metrics.get('selected', []))} atlas(es) "
                  f"registered; {written}", file=sys.stderr, flush=True)
            return
        if "applied" in metrics:
            print(f"ssmsr: applied in {metrics.get('seconds', 0):.1f} s; {written}", file=sys.stderr, flush=True)
            return
        if "training" in metrics:
            final = metrics.get("final_validation_loss")
            print(f"ssmsr: trained in {metrics.get('seconds', 0):.1f} s"
                  + (f"; final validation loss {final:.4f}" if final is not None else "") + f"; {written}",
                  file=sys.stderr, flush=True)
            return
        print(f"ssmsr: done in {metrics.get('seconds', 0):.1f} s; local NCC {metrics.get('ncc_before', 0):.3f} -> "
              f"{metrics.get('ncc_after', 0):.3f}; {written}", file=sys.stderr, flush=True)

    def error(self, message: str, kind: str) -> None:
        self._close()
        super().error(message, kind)


def make_reporter(kind: str) -> Reporter:
    """'bar', 'jsonl' or 'none'."""
    return {"bar": BarReporter, "jsonl": JsonLinesReporter, "none": Reporter}[kind]()
