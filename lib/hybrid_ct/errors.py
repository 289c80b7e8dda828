"""Exceptions raised for bad input; the message always names the problem."""


class InputError(ValueError):
    """The input cannot be read as what the caller asked for (not an image, empty, NaN, not a chest CT...)."""


class ModelNotReadyError(RuntimeError):
    """No trained model is available, so no prediction is made."""
