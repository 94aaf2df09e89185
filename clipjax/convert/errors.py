"""Errors raised while reading, converting or loading checkpoints."""


class ConversionError(ValueError):
    """A source checkpoint does not match what clipjax expects (keys, shapes, format)."""
