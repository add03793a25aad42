"""SSMSR: test-time trained multi-scale deformable registration, its command line and its 3D Slicer logic.

One folder per layer; a layer imports only those listed below it (see each package's docstring):

    gui/         the Slicer module panel (qt, ctk, Slicer application)       -> mrml, common
    mrml/        Qt-free, torch-free Slicer logic on MRML, the worker process -> common
    testing/     scenarios shared by pytest and the Slicer self-test          -> mrml, imaging, common
    interfaces/  the ``ssmsr`` command, the Python API, the demo              -> workflows, report, imaging, common
    report/      progress bars, JSON lines, figures from arrays               -> common
    workflows/   register, track, train, segment, model files                 -> engine, imaging, common
    engine/      torch: networks, losses, test-time training, pretraining     -> common
    imaging/     SimpleITK: images, cines, fields, atomic writes              -> common
    common/      standard library: errors, protocol, schedules, presets

``register``, ``track``, ``train``, ``segment`` and ``save_tracking`` below are imported lazily, so that the Slicer
panel loads without torch.
"""

__version__ = "0.1.0"


def register(*args, **kwargs):
    """See ``SSMSRRegistrationLib.workflows.register.register``."""
    from .interfaces import api

    return api.register(*args, **kwargs)


def track(*args, **kwargs):
    """See ``SSMSRRegistrationLib.workflows.track.track`` (cine tracking)."""
    from .interfaces import api

    return api.track(*args, **kwargs)


def train(*args, **kwargs):
    """See ``SSMSRRegistrationLib.workflows.train.train`` (pretraining on a collection)."""
    from .interfaces import api

    return api.train(*args, **kwargs)


def segment(*args, **kwargs):
    """See ``SSMSRRegistrationLib.workflows.segment.segment`` (atlas selection and label propagation)."""
    from .interfaces import api

    return api.segment(*args, **kwargs)


def save_tracking(*args, **kwargs):
    """See ``SSMSRRegistrationLib.interfaces.api.save_tracking`` (a tracking's files and figures)."""
    from .interfaces import api

    return api.save_tracking(*args, **kwargs)
