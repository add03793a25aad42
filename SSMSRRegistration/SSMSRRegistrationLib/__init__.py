"""SSMSR: test-time trained multi-scale deformable registration (engine, I/O, command line, Slicer logic).

Layers, top to bottom: ``engine`` (torch only), ``imaging`` (SimpleITK), ``api`` and ``cli``
(the background worker's entry point), ``logic`` (Slicer MRML, Qt-free).
"""

__version__ = "0.1.0"


def register(*args, **kwargs):
    """See ``SSMSRRegistrationLib.api.register`` (imported lazily so that the Slicer GUI loads without torch)."""
    from .api import register as _register

    return _register(*args, **kwargs)


def train(*args, **kwargs):
    """See ``SSMSRRegistrationLib.training.train`` (pretraining on a collection; imported lazily)."""
    from .training import train as _train

    return _train(*args, **kwargs)


def segment(*args, **kwargs):
    """See ``SSMSRRegistrationLib.segmentation.segment`` (atlas selection and label propagation; imported lazily)."""
    from .segmentation import segment as _segment

    return _segment(*args, **kwargs)
