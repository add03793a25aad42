"""What a user runs: register, track, train and segment, one case of a batch, presets applied, model files. Each
returns a plain result object whose ``save`` writes its files atomically; none draws figures.

May import ``engine``, ``imaging`` and ``common``; never slicer or qt.
"""
