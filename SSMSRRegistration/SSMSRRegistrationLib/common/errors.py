"""Exceptions shared by every layer."""

from typing import Callable, Optional


class InputError(ValueError):
    """Bad input (file, image, mask or option) with a message that says what to do.

    ``setting``: the option or argument the error concerns (its API keyword, e.g. "smoothness_weight"), or None. A
    message may hold "{setting}" where that option is named: each interface words it in its own vocabulary
    (``worded``); ``str()`` gives the keyword with spaces ("smoothness weight").
    """

    setting: Optional[str] = None  # also for subclasses whose __init__ does not call this one

    def __init__(self, message: str, setting: Optional[str] = None):
        super().__init__(message)
        self.setting = setting

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with "{setting}" replaced by ``name_of(setting)`` (a flag, a field label, a keyword)."""
        message = str(self.args[0]) if self.args else ""
        return message.replace("{setting}", name_of(self.setting)) if self.setting else message

    def __str__(self) -> str:
        text = self.worded(lambda name: name.replace("_", " "))
        starts_with_setting = bool(self.setting) and bool(self.args) and str(self.args[0]).startswith("{setting}")
        return text[:1].upper() + text[1:] if starts_with_setting else text


class RegistrationCancelled(RuntimeError):
    """The user cancelled a running registration."""


class TrainingStopped(RegistrationCancelled):
    """A training was stopped on request after a whole step; ``state`` is the training state then (a checkpoint
    holding it has been written by ``training.train``)."""

    def __init__(self, message: str, state=None):
        super().__init__(message)
        self.state = state
