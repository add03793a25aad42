"""Exceptions shared by every layer."""


class InputError(ValueError):
    """Bad input (file, image, mask or option) with a message that says what to do."""


class RegistrationCancelled(RuntimeError):
    """The user cancelled a running registration."""


class TrainingStopped(RegistrationCancelled):
    """A training was stopped on request after a whole step; ``state`` is the training state then (a checkpoint
    holding it has been written by ``training.train``)."""

    def __init__(self, message: str, state=None):
        super().__init__(message)
        self.state = state
