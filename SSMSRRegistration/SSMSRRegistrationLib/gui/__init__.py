"""The module panel inside Slicer: the parameter node, the widget, the QTimer that drives jobs, PyTorch set-up.

``panel`` is Qt-free (the panel's state and rules, tested on real MRML); the other modules import qt, ctk and
Slicer's application classes. May import ``mrml`` and ``common``; never torch at import time.
"""
