"""Progress text for the user, from the worker's protocol events."""

from __future__ import annotations

import math


def describeProgress(event: dict) -> str:
    """One line for a worker "progress" event, e.g. ``Scale 1/2 (1 of 2), step 40/100, loss -0.4123, 12 s left``."""
    text = (f"Scale {event.get('scale', '?')} ({int(event.get('scale_index', 0)) + 1} of {event.get('num_scales', '?')}), "
            f"step {event.get('step', '?')}/{event.get('steps', '?')}")
    if "atlas_count" in event:
        text = f"Atlas {int(event.get('atlas_index', 0)) + 1} of {event['atlas_count']}: " + text[0].lower() + text[1:]
    loss = event.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        text += f", loss {loss:.4f}"
    remaining = event.get("eta_s")
    if isinstance(remaining, (int, float)) and math.isfinite(remaining):
        text += f", {formatDuration(remaining)} left"
    return text


def formatDuration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
