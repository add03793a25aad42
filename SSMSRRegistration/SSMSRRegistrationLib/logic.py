"""``SSMSRRegistrationLib.logic.RegistrationLogic``: the Slicer logic's public entry point (see ``mrml.logic``)."""

from .mrml.jobs import JobState, RegistrationCancelledError, RegistrationError
from .mrml.logic import RegistrationLogic

__all__ = ["RegistrationLogic", "RegistrationError", "RegistrationCancelledError", "JobState"]
