"""Errors with one-line messages meant for users; the CLI prints them without a traceback."""


class ClipHeadsError(Exception):
    """Base class: the message is a complete, one-line explanation of what went wrong and what to do."""


class ModelLoadError(ClipHeadsError):
    """A model id or path could not be resolved or loaded."""


def require(condition: bool, message: str) -> None:
    """Raise a one-line :class:`ClipHeadsError` with ``message`` unless ``condition`` holds (argument checks)."""
    if not condition:
        raise ClipHeadsError(message)


class MaskError(ClipHeadsError):
    """A head mask does not fit the model, or a head label / layer spec cannot be parsed."""


class OperatorError(ClipHeadsError):
    """An ablation operator is unknown or lacks what it needs (e.g. head means)."""


class DataError(ClipHeadsError):
    """A dataset file, image or split is missing, corrupt or inconsistent."""


class OutputError(ClipHeadsError):
    """An output path cannot be written (a folder or file in the way, no permission, read-only, disk full).

    ``path`` is the path concerned; ``payload`` (when set) is the text that could not be written, so that the CLI can
    print it instead of losing a result.
    """

    def __init__(self, message: str, path=None, payload: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.payload = payload


class DeviceError(ClipHeadsError):
    """A device string cannot be parsed, or names a device this machine does not have."""
