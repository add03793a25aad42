"""Entry points: the ``ssmsr`` command (also the Slicer worker: ``python -m SSMSRRegistrationLib``), the Python
API behind ``SSMSRRegistrationLib.register/track/train/segment``, the demo, ``ssmsr batch`` on Dask, and the
thread and OpenMP set-up of a run.

May import ``workflows``, ``report``, ``imaging`` and ``common``; never slicer or qt.
"""
