"""Exceptions shared by every layer."""


class InputError(ValueError):
    """Bad input (file, image, mask or option) with a message that says what to do."""


class RegistrationCancelled(RuntimeError):
    """The user cancelled a running registration."""
