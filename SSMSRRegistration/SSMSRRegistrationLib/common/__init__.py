"""Common ground of every layer: errors, the worker's JSON-lines protocol, schedules and presets.

Standard library only (no numpy, torch, SimpleITK or Slicer), so that the engine, the command line and the
Slicer logic (which runs without torch) can all import it.
"""
