"""Geometry of volume nodes: IJK-to-RAS matrices, voxel arrays, the plane of a single slice, grid comparisons.

MRML nodes hold geometry in RAS millimetres; ITK files in LPS millimetres (flip the first two axes).
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from ..common.protocol import GRID_TOLERANCE
from .jobs import RegistrationError

#: How far (mm) a moving slice or mask may lie off the fixed slice's plane and still count as the same plane.
PLANE_TOLERANCE_MM = 1e-3

#: LPS <-> RAS: flip the first two axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijkToRas(volumeNode) -> np.ndarray:
    """The (4, 4) IJK-to-RAS matrix of a volume node (RAS millimetres)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def lpsGeometry(volumeNode) -> tuple[tuple, tuple, tuple]:
    """ITK image geometry of a volume node's grid: spacing (mm), origin (LPS mm) and row-major 3x3 direction (LPS)."""
    matrix = ijkToRas(volumeNode)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    return (tuple(spacing), tuple(LPS_TO_RAS @ matrix[:3, 3]),
            tuple((LPS_TO_RAS @ (matrix[:3, :3] / spacing)).flatten()))


def isSingleSlice(volumeNode) -> bool:
    return volumeNode.GetImageData().GetDimensions()[2] == 1


def volumeArray(volumeNode) -> np.ndarray:
    """Voxel array of a scalar volume node, indexed (k, j, i); a copy."""
    imageData = volumeNode.GetImageData()
    columns, rows, slices = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(slices, rows, columns).copy()


def imageDataFromArray(array: np.ndarray, dimensions) -> vtk.vtkImageData:
    """A vtkImageData of ``dimensions`` (i, j, k) holding ``array`` (k, j, i); the voxels are copied."""
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*[int(n) for n in dimensions])
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    return imageData


class SlicePlane:
    """The plane of a single-slice fixed volume, used as the 2D physical frame of the worker's images.

    Plane coordinates (millimetres) of a RAS point r are ``(e_i . (r - o), e_j . (r - o))`` where ``o`` is the
    fixed volume's origin and ``e_i``, ``e_j`` its unit i and j axes in RAS.
    """

    def __init__(self, fixedVolumeNode):
        matrix = ijkToRas(fixedVolumeNode)
        self.origin = matrix[:3, 3]
        self.axes = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)  # columns e_i, e_j, e_k (RAS)

    def imageGeometry(self, volumeNode, role: str) -> tuple[tuple, tuple, tuple]:
        """Spacing, origin and row-major 2x2 direction of ``volumeNode``'s slice in plane coordinates.

        Raises RegistrationError if the slice does not lie in the plane.
        """
        matrix = ijkToRas(volumeNode)
        spacing = np.linalg.norm(matrix[:3, :2], axis=0)
        inPlaneAxes = self.axes.T @ (matrix[:3, :2] / spacing)  # rows: components along e_i, e_j, e_k
        offset = self.axes.T @ (matrix[:3, 3] - self.origin)
        if np.abs(inPlaneAxes[2]).max() > 1e-6 or abs(offset[2]) > PLANE_TOLERANCE_MM:
            raise RegistrationError(f"The {role} '{volumeNode.GetName()}' is a single slice that does not lie in the "
                                    "plane of the fixed slice; resample it onto the fixed slice first.")
        return tuple(spacing), tuple(offset[:2]), tuple(inPlaneAxes[:2, :2].flatten())

    def writeFieldOnFixedSlice(self, planeFieldPath: str, outputPath: str, fixedVolumeNode) -> None:
        """Turn the worker's 2D field (plane frame) into a one-slice 3D ITK field on the fixed volume's geometry.

        A plane displacement (a, b) becomes the LPS vector of a * e_i + b * e_j; the output has the fixed volume's
        LPS origin, spacing and directions, so Slicer's transform reader loads it like any 3D field. (Slicer's
        reader does not read 2D two-component fields correctly, hence this step.)
        """
        import SimpleITK as sitk

        planeField = sitk.ReadImage(str(planeFieldPath))
        fixedDimensions = fixedVolumeNode.GetImageData().GetDimensions()
        if planeField.GetDimension() != 2 or planeField.GetSize() != fixedDimensions[:2]:
            raise RegistrationError("the 2D displacement field does not have the fixed slice's size.")
        planeVectors = sitk.GetArrayFromImage(planeField).astype(np.float64)  # (rows, columns, 2)
        lpsVectors = planeVectors @ (LPS_TO_RAS @ self.axes[:, :2]).T
        field = sitk.GetImageFromArray(lpsVectors[np.newaxis], isVector=True)
        spacing, origin, direction = lpsGeometry(fixedVolumeNode)  # the fixed slice's axes are the plane's
        field.SetSpacing(spacing)
        field.SetOrigin(origin)
        field.SetDirection(direction)
        sitk.WriteImage(field, str(outputPath))


def gridMatchesVolume(gridTransform, volumeNode) -> bool:
    """True if a displacement grid has the dimensions, origin, spacing and directions (RAS) of ``volumeNode``."""
    grid = gridTransform.GetDisplacementGrid()
    if grid is None or grid.GetDimensions() != volumeNode.GetImageData().GetDimensions():
        return False
    matrix = ijkToRas(volumeNode)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = gridTransform.GetGridDirectionMatrix()
    gridDirection = np.array([[direction.GetElement(row, column) for column in range(3)] for row in range(3)])
    scale = float(spacing.max())
    return bool(np.allclose(grid.GetSpacing(), spacing, rtol=GRID_TOLERANCE, atol=0)
                and np.allclose(grid.GetOrigin(), matrix[:3, 3], rtol=0, atol=GRID_TOLERANCE * scale)
                and np.allclose(gridDirection, matrix[:3, :3] / spacing, rtol=0, atol=GRID_TOLERANCE))
