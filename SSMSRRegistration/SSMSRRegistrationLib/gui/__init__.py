"""The module panel inside Slicer: the parameter node, the widget, the QTimer that drives jobs, PyTorch set-up.

``panel`` (the panel's state and rules), ``panel_runs`` (the background runs that complete with the parameter node
they started from) and ``torch_status`` (whether PyTorch is usable, and what to do if not) are Qt-free and tested in
pytest; the
other modules import qt, ctk and Slicer's application classes. May import ``mrml`` and ``common``; never torch
at import time.
"""
