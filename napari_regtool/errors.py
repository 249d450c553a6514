"""Exceptions whose message is a plain sentence a user can act on (shown as-is by the GUI and the CLI)."""


class RegtoolError(ValueError):
    """Base class: something about the input is wrong; the message says what and what to do."""


class InputError(RegtoolError):
    """A file, image or landmark set that cannot be used as given."""


class MaskTooSmallError(InputError):
    """A fixed mask that leaves too few voxels on the grid a registration works on."""


class FitError(RegtoolError):
    """A model cannot be fitted to the given landmarks (too few, degenerate, non-finite)."""


class NotInvertibleError(RegtoolError):
    """The transform has no inverse (or none that can be computed reliably)."""


class Cancelled(Exception):
    """Raised inside long work when the user asked to stop it."""


def user_message(exc: BaseException) -> str:
    """One line for the notification area: a :class:`RegtoolError`'s own sentence, plain words for running out
    of memory, else the exception's type and last message line (never a traceback)."""
    if isinstance(exc, RegtoolError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Not enough memory for this operation; try smaller images or the CPU device."
    if isinstance(exc, OSError) and exc.strerror:  # the file system's own words, with the file, and what to check
        import errno

        where = f" ({exc.filename})" if exc.filename else ""
        advice = {errno.ENOENT: "Check the path: the file or folder is not there.",
                  errno.EACCES: "Check that you may read (or write) there.",
                  errno.EPERM: "Check that you may read (or write) there.",
                  errno.EROFS: "The disk is read-only: choose a folder on another disk.",
                  errno.ENOSPC: "The disk is full: free some room, or choose another disk.",
                  errno.EDQUOT: "Your disk quota is used up: free some room, or choose another disk."}
        return f"{exc.strerror}{where}. {advice.get(exc.errno, 'Check the path, then try again.')}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
