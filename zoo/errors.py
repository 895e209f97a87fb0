"""The one exception family users meet; every message says what to do next."""


class ZooError(Exception):
    """Base class for every error `zoo` raises on purpose."""


class ManifestError(ZooError):
    """A manifest file or record is invalid."""


class UnknownModelError(ZooError, KeyError):
    """No baseline of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DownloadError(ZooError):
    """A checkpoint could not be fetched (network, HTTP status, offline mode)."""


class IntegrityError(ZooError):
    """A file's hash does not match what was expected."""


class CheckpointError(ZooError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""


class InputError(ZooError, ValueError):
    """Bad user input to predict (image, device, array shape)."""
