"""The engine: U-Nets, warping, losses, coarse-to-fine test-time training and pretraining, metrics.

Works on torch tensors in voxel units. May import torch and ``common``; never SimpleITK, vtk, slicer or qt.
"""
