"""Images in physical space: reading and checking images, cines and masks, resampling and fields of view, rigid and
affine pre-alignment, displacement-field files, atomic writes, the sample data shipped in registry packages.

May import SimpleITK, numpy and ``common``; never torch, slicer or qt.
"""
