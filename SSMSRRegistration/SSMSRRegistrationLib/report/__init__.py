"""Presentation: progress on the terminal or as JSON lines, and figures drawn from arrays.

May import matplotlib, PIL, numpy, tqdm and ``common``; never the engine's or the workflows' internals.
"""
