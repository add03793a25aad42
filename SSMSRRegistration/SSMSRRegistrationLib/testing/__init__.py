"""Test code: the scenarios that both the pytest suite and the module's Slicer self-test run on a real scene.

May import ``mrml``, ``imaging.sample_data`` and ``common``; not part of the product's code paths.
"""
