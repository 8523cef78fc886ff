"""The one base class for problems the user can fix; the CLI prints these without a traceback."""

import errno
import os

# what a write can fail with that the user fixes (space, quota, permissions, a file where a folder should be),
# rather than a fault of the program
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
               errno.EEXIST}


class FinetuneError(Exception):
    """Bad input or a failed check, with a message that names what and where."""


def is_disk_error(error: BaseException) -> bool:
    """A failed write of one of DISK_ERRNOS: an OSError, or torch's, safetensors' and tokenizers' own exception
    types, which carry it only in their message ("... (os error 28)", or the system's text)."""
    if isinstance(error, OSError):
        return error.errno in DISK_ERRNOS
    return any(f"os error {n}" in str(error) or os.strerror(n) in str(error) for n in DISK_ERRNOS)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (the hub's and the tokenizer loader's span several), or its type's name."""
    return " ".join(str(error).split()) or type(error).__name__
