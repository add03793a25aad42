"""Entry points: the ``ssmsr`` command (also the Slicer worker: ``python -m SSMSRRegistrationLib``), the Python
API behind ``SSMSRRegistrationLib.register/track/train/segment``, and the demo.

May import ``workflows``, ``report``, ``imaging`` and ``common``; never slicer or qt.
"""
