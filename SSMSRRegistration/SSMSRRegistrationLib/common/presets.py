"""Named test-time training budgets: the values a preset gives the run options (``run_config.RUN_OPTIONS``) of each
kind of run, shared by the command line, the Python API, batch and the Slicer module.

* ``balanced`` (the default): pairs 1/4,1/2,1 x 300 steps with the smoothness weight 3; cines 1/8,1/4,1/2,1 x 600
  steps for the sequence with the smoothness weight 2 plus the MSE term (weight 1000): the frames of one cine share
  their intensities, so their squared difference is a fair similarity too; on 3D brains between subjects (bias
  field, noise) it lowered the Dice, so pairs train without it. All measured by the accuracy ablation
  (Testing/benchmarks/ablation.py, RESULTS.md). About 7 min for a 48x64x48 volume and under 2 min for a 320x240
  image on a 2-core CPU without bfloat16 (measured: 435 s and 109 s); a 15-frame 320x240 cine about 4 min.
* ``paper``: the paper's schedules (1/2,1 for image pairs, 1/8,1/4,1/2,1 for echo cines), 3500 steps per scale,
  the paper's loss (smoothness weight 10, no MSE term) and learning rate 1e-3: reproduces the paper.
* ``fast``: a short budget for a laptop CPU or a quick look: pairs 1/4,1/2,1 x 80 steps (on the evaluation's
  hippocampus-sized 3D brain pairs, 48x64x48 at 2 mm, level with ANTs SyN's Dice at about a quarter of its time on
  a 2-core CPU without bfloat16, see Testing/benchmarks/speed.py and RESULTS.md); cines as ``balanced``.

``balanced`` and ``fast`` leave the training patch automatic (``run_config``: 96 voxels a side in 3D, the whole image
in 2D): grids of the paper's sizes fit in it and train on the whole image as measured above; larger 3D grids (a 1 mm
brain's finest scale) train on patches. ``paper`` trains on the whole image at every size.

``balanced`` and ``fast`` predict the fields of 3D images whose working voxels are under 1.5 mm at half resolution
at every scale but the coarsest (``half_field_below``: a 1 mm brain's finest field at 2 mm, the U-Net of each of those
steps on an eighth of the voxels); images at the paper's sizes (2 mm) are not affected, nor are 2D images
(Testing/benchmarks/RESULTS.md "Fields at half resolution"). ``paper`` predicts at full resolution at every size.

Pairs of fine 3D images (working voxels finer than ``half_field_below``, at least 128 voxels on every axis: a 1 mm
brain) take ``balanced``'s and ``fast``'s values for fine pairs (``Preset.fine_pairs``, chosen by
``workflows.register.fine_pair_run``): a 1/8 scale first, 64^3 training patches, ``balanced`` 150 steps a scale,
``fast`` 80 with lambda 3.

3D+t cines (sequences of volumes, ``volume_cine`` runs) take each preset's values for pairs, their steps counted for
the whole sequence: the echo cines' MSE term misled them (test_sequences_3d.py). ``balanced`` and ``fast`` stop at
the 1/2 scale (1/4,1/2), train up to 8 pairs a step (``batch_size``: every pair of a 9-frame series, as many voxels
as one full-resolution pair) and the 1/4 scale as many as a step at 1/2 holds in voxels (``coarse_batches="fill"``),
in 120 steps (``fast``: 80). On an 8-frame 96^3 series with a known motion (1 mm voxels, so the 1/2 scale predicts
its field at half resolution, 4 mm), the full-resolution scale, trained one pair a step, added error in 75 % more
time (150 steps, seed 5: 0.22 mm without it, 0.29 mm with it, 63 against 110 s). Without it, 120 steps ended 0.17
to 0.27 mm off over eight seeds in 52-57 s (150 steps: 0.16 to 0.30 mm), 80 steps 0.22 to 0.48 mm in 35-43 s (ANTs
SyN frame by frame: 0.47 mm in 70-79 s). Add the full resolution (``scales="1/4,1/2,1"``) where the motion has
detail finer than the 1/2 scale's field. Testing/benchmarks/track_volumes.py, RESULTS.md.

Pretraining (``ssmsr train``) starts from the paper's settings under every preset. Convergence-based stopping
(``stop_window``) is in no preset: it saved steps from about 600 steps per scale on (Testing/benchmarks/
convergence.py) and never ended a scale at 300 steps or fewer on the ablation's echo and brain pairs.

All train with mixed precision (bfloat16 convolutions, losses in float32) where the device runs bfloat16
natively, and in float32 elsewhere; ``precision="float32"`` forces the plain float32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

#: The kinds of run: a registration of two images (``register``, ``segment``), a 2D+t cine tracked as one sequence
#: (``track``; its steps are for the whole sequence), a 3D+t cine (a sequence of volumes) tracked likewise, a
#: pretraining on a collection (``train``).
KINDS = ("pair", "cine", "volume_cine", "pretrain")

PRECISIONS = ("mixed", "float32")
#: How many pairs a cine's coarser scales train per step: "same" as the finest scale (the pairs per step), or "fill":
#: as many as the finest scale's step holds in voxels (``engine.multiscale.RegistrationSettings.pairs_per_step_at``).
COARSE_BATCHES = ("same", "fill")
#: Convergence-based stopping's tolerance when only its window is given (Testing/benchmarks/convergence.py).
DEFAULT_STOP_TOLERANCE = 2e-4
#: The paper's smoothness weight (lambda of Eq. 1) and Adam learning rate.
PAPER_SMOOTHNESS_WEIGHT = 10.0
PAPER_LEARNING_RATE = 1e-3

#: The paper's training, for image pairs and for pretraining.
PAPER_PAIRS = {"scales": "1/2,1", "steps": 3500, "smoothness_weight": PAPER_SMOOTHNESS_WEIGHT,
               "learning_rate": PAPER_LEARNING_RATE, "mse_weight": 0.0}
#: The paper trains every scale on the whole image (the other presets train 3D images on patches where the grid is
#: larger than the option's automatic patch, see ``run_config``).
WHOLE_IMAGE = {"patch_size": 0}
#: Pretraining under every preset: the paper's pairs (its loss has no MSE term to set).
PAPER_PRETRAINING = {name: value for name, value in PAPER_PAIRS.items() if name != "mse_weight"}
#: Pairs of ``balanced`` and ``fast``; a preset's 3D+t cines take its pairs' values: the echo cines' MSE term
#: (weight 1000) made a sequence of brain volumes miss known motions by up to 10 mm (test_sequences_3d.py).
#: ``balanced`` and ``fast`` predict the fields of 3D images finer than 1.5 mm at half resolution but at the coarsest
#: scale (a 1 mm brain's finest field at 2 mm; images of the paper's sizes, at 2 mm, are not affected).
HALF_FIELD_BELOW_MM = 1.5
BALANCED_PAIRS = {**PAPER_PAIRS, "scales": "1/4,1/2,1", "steps": 300, "smoothness_weight": 3.0,
                  "half_field_below": HALF_FIELD_BELOW_MM}
FAST_PAIRS = {**BALANCED_PAIRS, "steps": 80, "smoothness_weight": PAPER_SMOOTHNESS_WEIGHT}
#: Pairs of fine 3D images (working voxels finer than the half-field threshold, ``half_field_below``: a 1 mm brain)
#: under ``balanced`` and ``fast``: one scale coarser first (1/8: with fields at half resolution, the coarsest scale is
#: the one that predicts at full resolution, and at 1/4 of a 1 mm brain it cost as much per step as the finer ones),
#: scales larger than 64 voxels trained on 64^3 patches, ``balanced`` 150 steps a scale. On the 1 mm brain, under
#: the AVX2 cap (float32): Dice 96.18 % in 109 s with the affine pre-alignment (seeds 0-3: 95.78-96.18 %), antspyx's
#: default SyN 93.94 % in 99 s in the same run; the pairs' values took 352 s for 97.13 % without the pre-alignment
#: (Testing/benchmarks/RESULTS.md, issue 24).
BALANCED_FINE_PAIRS = {"scales": "1/8,1/4,1/2,1", "steps": 150, "patch_size": 64}
#: ``fast``'s fine pairs: 80 steps with ``balanced``'s lambda 3 (on the 1 mm brain, seeds 0-2: Dice 95.47, 93.93,
#: 95.20 % against 93.30, 94.34, 93.32 % with fast's lambda 10, in 60-72 s under the AVX2 cap).
FAST_FINE_PAIRS = {**BALANCED_FINE_PAIRS, "steps": 80, "smoothness_weight": BALANCED_PAIRS["smoothness_weight"]}
#: 3D+t cines of ``balanced`` and ``fast``: their pairs' values (``fast`` with ``balanced``'s lambda 3), scales 1/4
#: and 1/2, up to 8 pairs a step at 1/2 and the 1/4 scale filled (see the module's docstring).
BALANCED_VOLUME_CINES = {**BALANCED_PAIRS, "scales": "1/4,1/2", "batch_size": 8, "coarse_batches": "fill",
                         "steps": 120}
FAST_VOLUME_CINES = {**BALANCED_VOLUME_CINES, "steps": 80}
#: 2D+t cines of ``balanced`` and ``fast``: lambda 2 and the MSE term, measured on the echo cine (RESULTS.md).
CINES = {"scales": "1/8,1/4,1/2,1", "steps": 600, "smoothness_weight": 2.0, "learning_rate": PAPER_LEARNING_RATE,
         "mse_weight": 1000.0}


@dataclass(frozen=True)
class Preset:
    """A preset: the value it gives each run option, per kind of run (an option it does not name keeps the option's
    own default), and a one-line summary."""

    name: str
    summary: str
    values: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fine_pairs: Dict[str, Any] = field(default_factory=dict)  # replace ``values["pair"]``'s for fine 3D images

    def value(self, kind: str, name: str, default: Any = None, fine: bool = False) -> Any:
        """The preset's value of option ``name`` for ``kind`` runs, or ``default`` where it gives none; ``fine``: the
        run registers 3D images finer than the half-field threshold (``fine_pairs`` then come first for pairs)."""
        if fine and kind == "pair" and name in self.fine_pairs:
            return self.fine_pairs[name]
        return self.values.get(kind, {}).get(name, default)


PRESETS = {
    "balanced": Preset("balanced",
                       "pairs 1/4,1/2,1 x 300 steps with lambda 3, as measured best (for 48x64x48 about 7 min on 2 CPU "
                       "cores without bfloat16; 3D pairs of 1 mm brain size 1/8,1/4,1/2,1 x 150 steps on 64^3 patches, "
                       "about 2 min), cines 1/8,1/4,1/2,1 x 600 steps with lambda 2 and the MSE term "
                       "(weight 1000)",
                       {"pair": BALANCED_PAIRS, "cine": CINES, "volume_cine": BALANCED_VOLUME_CINES,
                        "pretrain": PAPER_PRETRAINING}, BALANCED_FINE_PAIRS),
    "paper": Preset("paper", "the paper's schedules and 3500 training steps per scale",
                    {"pair": {**PAPER_PAIRS, **WHOLE_IMAGE},
                     "cine": {**PAPER_PAIRS, **WHOLE_IMAGE, "scales": "1/8,1/4,1/2,1"},
                     "volume_cine": {**PAPER_PAIRS, **WHOLE_IMAGE}, "pretrain": PAPER_PRETRAINING}),
    "fast": Preset("fast",
                   "pairs 1/4,1/2,1 x 80 steps (for 48x64x48 about 100 s on 2 CPU cores without bfloat16; 3D pairs of "
                   "1 mm brain size 1/8,1/4,1/2,1 on 64^3 patches with lambda 3, about 1 min), cines as balanced",
                   {"pair": FAST_PAIRS, "cine": CINES, "volume_cine": FAST_VOLUME_CINES,
                    "pretrain": PAPER_PRETRAINING}, FAST_FINE_PAIRS),
}
DEFAULT_PRESET = "balanced"
