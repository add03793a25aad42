"""The Slicer logic: MRML nodes in, the background worker, MRML nodes out. Qt-free and torch-free, so it runs on any
``vtkMRMLScene``, inside Slicer and on the ``slicer-core`` wheel in pytest.

May import slicer (MRML), vtk, numpy and ``common``; never torch or qt. It talks to the worker only through the
command line and the JSON-lines protocol (``common.protocol``).
"""
