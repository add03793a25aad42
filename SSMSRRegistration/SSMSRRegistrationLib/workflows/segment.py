"""Registration-based segmentation with atlas selection (paper Sec. III-B/C, ``ssmsr segment``).

    >>> from SSMSRRegistrationLib import segment
    >>> result = segment("target.nii.gz", [("atlas1.nii.gz", "atlas1-labels.nii.gz"),
    ...                                    ("atlas2.nii.gz", "atlas2-labels.nii.gz")], top_k=1, steps=500)  # doctest: +SKIP
    >>> result.save("target-labels.nii.gz"); result.ranking  # doctest: +SKIP

1. Every atlas image is brought onto the target's grid by world coordinates (linear interpolation, 0 outside)
   and scored by NLCC with the target: the mean squared local normalised cross-correlation of Eq. 2 (window:
   the registration's NCC window), on intensities normalised as for registration, inside the target mask if
   one is given. Atlases are ranked by decreasing NLCC (ties: the order given).
2. The best ``top_k`` atlases are registered onto the target (SSMSR test-time training, optionally starting
   from a pretrained model) and their label maps warped onto the target grid (nearest neighbour).
3. With one atlas its warped labels are the result; with several, a per-voxel majority vote. Ties are resolved
   deterministically in favour of the best-ranked atlas among those that voted for a tied label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from .register import register
from ..engine.losses import local_ncc
from ..common.errors import InputError
from ..common.protocol import Atlas, ProgressCallback, Ranking
from ..imaging.fields import write_image
from ..imaging.images import ImageLike, check_image, normalised_on_grid, read_image
from .models import SavedModel, load_model
from .provenance import input_record, sidecar_path, with_outputs, write_sidecar
from ..common.run_config import RunConfiguration, combined, takes_run_options

AtlasLike = Tuple[ImageLike, ImageLike]


def _name(source: ImageLike, fallback: str) -> str:
    return os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else fallback


def majority_vote(label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-voxel majority vote of label maps given best-ranked first; ties go to the best-ranked atlas.

    For each voxel, every atlas k gets the number of atlases that agree with its label there; the label of the
    first atlas (in rank order) with the most agreement wins. So a label proposed by more atlases always wins,
    and among equally frequent labels the one the best-ranked atlas proposed wins. Works for any number of
    labels (O(K^2) comparisons per voxel for K atlases).
    """
    if not label_maps:
        raise ValueError("no label maps to fuse")
    stack = np.stack([np.asarray(m) for m in label_maps])
    if len(label_maps) == 1:
        return stack[0].copy()
    agreement = np.stack([(stack == stack[k]).sum(axis=0) for k in range(len(label_maps))])
    winner = np.argmax(agreement, axis=0)  # argmax takes the first maximum: the best-ranked among tied atlases
    return np.take_along_axis(stack, winner[np.newaxis], axis=0)[0]


def _integer_labels(image: sitk.Image, role: str) -> sitk.Image:
    """The label map as an integer image; InputError for non-integral values (e.g. a probability map)."""
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"The {role} holds non-integer values (a probability map or an intensity image?); "
                             "give a label map with one integer label per structure.")
        converted = sitk.Cast(image, sitk.sitkInt32)
        return converted
    return image


@dataclass
class SegmentationOutput:
    """What ``segment`` returns.

    labels: the propagated (and, for top_k > 1, fused) label map on the target grid.
    ranking: one dict per atlas, best first: {"rank", "atlas", "labels", "nlcc", "registered"}.
    registrations: metrics of each registration, in rank order.
    provenance: what reproduces the run (``provenance.run_record``); ``save`` writes it beside the label map.
    """

    labels: sitk.Image
    ranking: List[Dict[str, Any]]
    registrations: List[Dict[str, Any]] = field(default_factory=list)
    provenance: Dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> Dict[str, Any]:
        return {"ranking": self.ranking, "registrations": self.registrations,
                "selected": [entry["atlas"] for entry in self.ranking if entry["registered"]],
                "seconds": sum(r.get("seconds", 0.0) for r in self.registrations)}

    def save(self, labels_path: str) -> Dict[str, str]:
        """Write the label map atomically, then its provenance (``provenance.sidecar_path(labels_path)``); returns
        the paths written."""
        write_image(self.labels, labels_path)
        outputs = {"labels": os.path.abspath(labels_path)}
        sidecar = write_sidecar(sidecar_path(labels_path), with_outputs(self.provenance, outputs))
        return {**outputs, "provenance": sidecar}


def format_ranking(ranking: Sequence[Dict[str, Any]]) -> str:
    """The ranking as a small table (one atlas per line, best first)."""
    lines = ["rank  NLCC    registered  atlas"]
    for entry in ranking:
        lines.append(f"{entry['rank']:>4}  {entry['nlcc']:.4f}  {'yes' if entry['registered'] else 'no':<10}  "
                     f"{entry['atlas']}")
    return "\n".join(lines)


def rank_atlases(target: sitk.Image, atlas_images: Sequence[sitk.Image], names: Sequence[str], window: int,
                 mask: Optional[np.ndarray] = None) -> List[Tuple[int, float]]:
    """(atlas index, NLCC) pairs, best first (ties keep the given order); atlases resampled onto the target grid."""
    target_tensor = torch.from_numpy(normalised_on_grid(target, target, "target image", "target"))[None, None]
    mask_tensor = torch.from_numpy(mask.astype(np.float32))[None, None] if mask is not None else None
    scores = []
    for index, (atlas, name) in enumerate(zip(atlas_images, names)):
        atlas_on_target = normalised_on_grid(atlas, target, f"atlas image {name}", "target")
        atlas_tensor = torch.from_numpy(atlas_on_target)[None, None]
        with torch.no_grad():
            scores.append((index, float(local_ncc(target_tensor, atlas_tensor, window, mask_tensor))))
    return sorted(scores, key=lambda item: -item[1])  # sorted() is stable: ties keep the given order


@takes_run_options("pair")
def segment(target: ImageLike, atlases: Sequence[AtlasLike], *, top_k: int = 1,
            fixed_mask: Optional[ImageLike] = None, model: Optional[Union[str, os.PathLike, SavedModel]] = None,
            progress: Optional[ProgressCallback] = None, should_stop: Optional[Callable[[], bool]] = None,
            config: Optional[RunConfiguration] = None, preset: Optional[str] = None,
            **options) -> SegmentationOutput:
    """Segment ``target`` by registering the most similar atlas(es) onto it (see the module docstring).

    Args:
        target: image file, DICOM folder or SimpleITK image (2D or 3D).
        atlases: (image, label map) pairs; each label map lies in its atlas image's physical space.
        top_k: how many of the best-ranked atlases to register and fuse (1 <= top_k <= len(atlases)).
        fixed_mask: optional target mask for the ranking and the registrations' similarity term.
        model, config, preset, options: as for ``register`` (the NCC window also ranks the atlases).
        progress: receives {"event": "ranking", "ranking": [...]}, then for each registered atlas
            {"event": "atlas", "rank", "index" (0-based among those registered), "count", "atlas", "nlcc"}
            followed by that registration's events (with "atlas_index" and "atlas_count" added and "fraction"
            over all registrations).

    A frame of a real echocardiogram segmented with two others as atlases (their bright regions as labels):

    >>> import SimpleITK as sitk, SSMSRRegistrationLib as ssmsr
    >>> from SSMSRRegistrationLib.imaging.sample_data import shipped_echo_frames
    >>> target, first, second = shipped_echo_frames([0, 10, 20])
    >>> atlases = [(image, sitk.Cast(image > 60, sitk.sitkUInt8)) for image in (first, second)]
    >>> result = ssmsr.segment(target, atlases, scales="1/2,1", steps=5, device="cpu")
    >>> [entry["rank"] for entry in result.ranking], result.labels.GetSize() == target.GetSize()
    ([1, 2], True)
    """
    configuration = combined(config, preset, **options)
    ncc_window = configuration.resolve("pair").ncc_window
    if not atlases:
        raise InputError("Give at least one atlas (an image and its label map).")
    if not 1 <= int(top_k) <= len(atlases):
        raise InputError(f"{{setting}} must be between 1 and the number of atlases ({len(atlases)}), got {top_k}.",
                         setting="top_k")
    top_k = int(top_k)
    model_source = model
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)

    target_image = read_image(target, "target image")
    check_image(target_image, "target image")
    ndim = target_image.GetDimension()
    if model is not None:
        model.check_fits(ndim, None, os.fspath(model_source) if isinstance(model_source, (str, os.PathLike))
                         else "the model")
    mask_array = None
    if fixed_mask is not None:
        from .register import _prepare_mask

        mask_array = _prepare_mask(fixed_mask, target_image)

    atlas_images, atlas_labels, names, label_names = [], [], [], []
    for index, (image_source, labels_source) in enumerate(atlases):
        name = _name(image_source, f"atlas {index + 1}")
        image = read_image(image_source, f"atlas image {name}")
        check_image(image, f"atlas image {name}", ndim)
        labels = read_image(labels_source, f"atlas labels {name}")
        check_image(labels, f"label map of the atlas {name}", ndim)
        atlas_images.append(image)
        atlas_labels.append(_integer_labels(labels, f"label map of the atlas {name}"))
        names.append(name)
        label_names.append(_name(labels_source, f"labels {index + 1}"))

    window = int(ncc_window) if ncc_window else (model.ncc_window if model is not None else (5 if ndim == 3 else 6))
    order = rank_atlases(target_image, atlas_images, names, window, mask_array)
    ranking = [{"rank": rank + 1, "atlas": names[index], "labels": label_names[index], "nlcc": score,
                "registered": rank < top_k} for rank, (index, score) in enumerate(order)]
    if progress is not None:
        progress(Ranking(ranking=ranking).to_dict())

    warped_maps, registrations, provenance = [], [], {}
    for position, (index, score) in enumerate(order[:top_k]):
        if progress is not None:
            progress(Atlas(rank=position + 1, index=position, count=top_k, atlas=names[index], nlcc=score).to_dict())

        def forward(event: dict, position: int = position) -> None:
            event = dict(event, atlas_index=position, atlas_count=top_k)
            if "fraction" in event:
                event["fraction"] = (position + event["fraction"]) / top_k
            progress(event)

        result = register(target_image, atlas_images[index], fixed_mask=fixed_mask, moving_labels=atlas_labels[index],
                          model=model, config=configuration, progress=forward if progress is not None else None,
                          should_stop=should_stop)
        warped_maps.append(sitk.GetArrayFromImage(result.warped_labels))
        registrations.append({"atlas": names[index], **result.metrics})
        provenance = result.provenance  # the same settings for every atlas

    fused = majority_vote(warped_maps)
    dtype = np.result_type(*[m.dtype for m in warped_maps])
    labels = sitk.GetImageFromArray(fused.astype(dtype if np.issubdtype(dtype, np.integer) else np.int32))
    labels.CopyInformation(target_image)
    atlas_inputs = {f"atlas_{number}_{part}": source for number, pair in enumerate(atlases, 1)
                    for part, source in zip(("image", "labels"), pair)}
    inputs = {"target": target, "fixed_mask": fixed_mask, **atlas_inputs,
              "model": model_source if isinstance(model_source, (str, os.PathLike)) else None}
    provenance = {**provenance, "kind": "segment",
                  "inputs": {name: input_record(value) for name, value in inputs.items()},
                  "options": {"top_k": top_k, "ranking": ranking}}
    return SegmentationOutput(labels=labels, ranking=ranking, registrations=registrations, provenance=provenance)
