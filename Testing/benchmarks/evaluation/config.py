"""The three configurations of the harness: ``tiny`` (the test), ``quick`` (a 2-core CPU) and ``full`` (the paper)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Tuple

#: Cases in the order they are run and reported.
ALL_CASES = ("hippocampus_crop", "whole_brain", "individual_vs_icbm", "echo_cine")


@dataclass(frozen=True)
class Config:
    """What to run and how hard each method may try.

    Sizes are in voxels, spacings in mm, steps and iterations per scale / level.
    """

    name: str
    cases: Tuple[str, ...] = ALL_CASES
    crop_spacing_mm: float = 2.0  # hippocampus-sized crop of ICBM152: 48x64x48 voxels at 2 mm in the full run
    crop_size: Tuple[int, int, int] = (48, 64, 48)  # ITK order (x, y, z)
    whole_brain_spacing_mm: float = 2.0
    synthetic_test_pairs: int = 3  # simulated subjects registered per synthetic case (mean +/- std over them)
    schedule_3d: str = "1/2,1"  # the paper's hippocampus schedule
    schedule_2d: str = "1/8,1/4,1/2,1"  # the paper's echo schedule
    ssmsr_steps: int = 3500  # test-time training steps per scale (paper)
    precision: str = "mixed"  # of SSMSR/SSR test-time training ("mixed" or "float32", see presets)
    cine_steps: int = 3500  # steps per scale for a whole cine (paper: per sequence)
    cine_batch: int = 1  # frame pairs per step for the cine
    cine_frames: int = 15  # frames whose consecutive pairs are evaluated; the remaining pairs train VoxelMorph
    echo_shrink: int = 1  # integer downsampling of the echo frames (tiny only)
    training_pairs: int = 8  # pairs the VoxelMorph-equivalent network is trained on (3D cases)
    training_steps_per_pair: int = 3500  # its steps per scale = this x number of training pairs (paper)
    ants_iterations: Tuple[int, int, int] = (200, 200, 200)  # paper
    elastix_iterations: int = 500  # paper (NiftyReg's 500)
    demons_iterations: Tuple[int, int, int] = (100, 50, 25)  # levels shrunk 4x, 2x, 1x
    device: str = "auto"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Config(name="full")

#: About 20 minutes on a 2-core CPU (20.7 min measured while other jobs shared it): fewer steps and
#: iterations, smaller images, fewer pairs.
QUICK = replace(FULL, name="quick", whole_brain_spacing_mm=4.0, synthetic_test_pairs=2, ssmsr_steps=150,
                cine_steps=150, cine_batch=2, cine_frames=8, training_pairs=4, training_steps_per_pair=50,
                ants_iterations=(100, 50, 10), elastix_iterations=200)

#: Seconds, for the test: tiny images, a handful of steps; checks the plumbing, not the accuracy ranking.
TINY = replace(FULL, name="tiny", cases=("hippocampus_crop", "echo_cine"), crop_spacing_mm=4.0,
               crop_size=(20, 24, 20), synthetic_test_pairs=1, ssmsr_steps=20, cine_steps=5, cine_batch=1,
               cine_frames=3, echo_shrink=4, training_pairs=2, training_steps_per_pair=3,
               ants_iterations=(10, 5, 0), elastix_iterations=20, demons_iterations=(10, 5, 5), threads=2)

PRESETS = {config.name: config for config in (TINY, QUICK, FULL)}
