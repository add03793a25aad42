"""Figures of a cine tracking (matplotlib): an animated GIF of the motion and a PNG like the paper's Fig. 3.

Arrows show the tissue motion from frame t-1 to frame t: -u_t(p) drawn at pixel p of frame t, where u_t
warps frame t-1 onto frame t (frame_t(p) ~ frame_{t-1}(p + u_t(p))). They sit on a regular grid inside the
mask and are magnified by one gain per figure, printed in the title. Frames are drawn as stored (array row 0
at the top) with the pixel aspect ratio of their spacing.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Sequence, Tuple

import numpy as np

from ..common.errors import InputError

#: Number of arrows along the longer frame axis.
ARROWS_ACROSS = 24

#: Playback speed of the GIF (slower than real time, to follow the arrows).
FRAMES_PER_SECOND = 8

#: Rows (pairs) of the overview PNG, evenly spread over the cine.
OVERVIEW_PAIRS = 3

#: Smallest width of a GIF frame, pixels (small cines are enlarged).
MIN_ANIMATION_WIDTH = 480

ARROW_COLOUR = "#ffd21f"


def _arrow_step(shape: Tuple[int, int]) -> int:
    """Distance in pixels between neighbouring arrows on an (H, W) frame."""
    return max(1, round(max(shape) / ARROWS_ACROSS))


def _arrow_grid(shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, columns) index arrays of the arrow positions on an (H, W) frame."""
    step = _arrow_step(shape)
    rows = np.arange(step // 2, shape[0], step)
    columns = np.arange(step // 2, shape[1], step)
    return np.meshgrid(rows, columns, indexing="ij")


def arrow_gain(displacements: np.ndarray, masks: np.ndarray) -> float:
    """Magnification making the 99th percentile of the arrow lengths about 0.9 grid step, rounded to 1, 2 or 5
    times a power of ten. displacements: (N, 2, H, W) voxels; masks: (N, H, W) bool."""
    rows, columns = _arrow_grid(displacements.shape[2:])
    lengths = np.hypot(displacements[:, 0, rows, columns], displacements[:, 1, rows, columns])
    lengths = lengths[masks[:, rows, columns]]
    typical = float(np.percentile(lengths, 99)) if lengths.size else 0.0
    if typical <= 0:
        return 1.0
    wanted = 0.9 * _arrow_step(displacements.shape[2:]) / typical
    power = 10.0 ** math.floor(math.log10(wanted))
    return next(m * power for m in (5, 2, 1) if m * power <= wanted)


def _draw_frame(axes, frame: np.ndarray, aspect: float, title: str) -> None:
    axes.imshow(frame, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()


def _draw_motion(axes, frame: np.ndarray, displacement: np.ndarray, mask: np.ndarray, gain: float,
                 aspect: float, title: str) -> None:
    """``frame`` (H, W) with the motion -``displacement`` ((2, H, W) voxels) as arrows inside ``mask``."""
    _draw_frame(axes, frame, aspect, title)
    rows, columns = _arrow_grid(frame.shape)
    inside = mask[rows, columns]
    rows, columns = rows[inside], columns[inside]
    axes.quiver(columns, rows, -gain * displacement[1, rows, columns], -gain * displacement[0, rows, columns],
                angles="xy", scale_units="xy", scale=1.0, color=ARROW_COLOUR, width=0.004, headwidth=4)


def check_figure_support() -> None:
    """Raise InputError when matplotlib, which draws the GIF and PNG, is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("The tracking GIF and PNG need matplotlib: pip install matplotlib (or ask for no "
                         "figures: --no-figures, figures=False).")


def write_animation(path: str, frames: np.ndarray, masks: np.ndarray, displacements: np.ndarray,
                    frame_pairs: Sequence[Tuple[int, int]], aspect: float, where: str = "") -> None:
    """Animated GIF: for each pair, its fixed frame with the motion from its moving frame.

    frames: (T, H, W) in [0, 1]; masks: (T, H, W) bool; displacements: (N, 2, H, W) voxels, index i warping frame
    frame_pairs[i][0] (moving) onto frame frame_pairs[i][1] (fixed); aspect: the frames' row spacing / column
    spacing; where: added to each title (e.g. the slice shown of 3D frames).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    gain = arrow_gain(displacements, masks[[fixed for _, fixed in frame_pairs]])
    height, width = frames.shape[1:]
    zoom = max(1.0, MIN_ANIMATION_WIDTH / width)
    title_share = 0.93
    figure = Figure(figsize=(width * zoom / 100, height * aspect * zoom / 100 / title_share), dpi=100)
    canvas = FigureCanvasAgg(figure)
    pictures = []
    for index, (moving, fixed) in enumerate(frame_pairs):
        figure.clear()
        axes = figure.add_axes((0.0, 0.0, 1.0, title_share))
        _draw_motion(axes, frames[fixed], displacements[index], masks[fixed], gain, aspect,
                     f"frame {moving} \u2192 {fixed}{where}   (arrows \u00d7{gain:g})")
        canvas.draw()
        pictures.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    pictures[0].save(path, format="GIF", save_all=True, append_images=pictures[1:],
                     duration=round(1000 / FRAMES_PER_SECOND), loop=0)


def write_overview(path: str, frames: np.ndarray, masks: np.ndarray, per_scale: Sequence[np.ndarray],
                   scale_names: Sequence[str], frame_pairs: Sequence[Tuple[int, int]], aspect: float,
                   where: str = "") -> None:
    """PNG like the paper's Fig. 3: for a few pairs, the moving and fixed frames and the field after each scale.

    per_scale: the (N, 2, H, W) voxel fields after each scale, coarse to fine (the last one is the result);
    scale_names: their scales ("1/2", "1"); other arguments as for ``write_animation``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(frame_pairs)
    rows = sorted({int(i) for i in np.linspace(0, count - 1, min(OVERVIEW_PAIRS, count)).round()})
    gain = arrow_gain(per_scale[-1][rows], masks[[frame_pairs[i][1] for i in rows]])
    height, width = frames.shape[1:]
    columns = 2 + len(per_scale)
    panel_width = 3.0
    panel_height = panel_width * height * aspect / width + 0.35
    figure = Figure(figsize=(columns * panel_width, len(rows) * panel_height + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    for row, index in enumerate(rows):
        moving, fixed = frame_pairs[index]
        first = row * columns + 1
        _draw_frame(figure.add_subplot(len(rows), columns, first), frames[moving], aspect, f"frame {moving} (moving)")
        _draw_frame(figure.add_subplot(len(rows), columns, first + 1), frames[fixed], aspect, f"frame {fixed} (fixed)")
        for offset, (scale, displacements) in enumerate(zip(scale_names, per_scale)):
            _draw_motion(figure.add_subplot(len(rows), columns, first + 2 + offset), frames[fixed],
                         displacements[index], masks[fixed], gain, aspect, f"SSMSR ({scale})")
    figure.suptitle(f"Motion from the moving to the fixed frame after each scale{where} (arrows \u00d7{gain:g})",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(path, format="png")
