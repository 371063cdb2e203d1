"""Exit codes and the one error type of the ``download`` command.

Every failure a user can act on is a :class:`DownloadError` with an exit code a script can test and a message
that names the file (or input), what was found and the fix.
"""
from __future__ import annotations

__all__ = ["DownloadError", "EXIT_CODES", "OK", "USAGE", "TERMS_NOT_ACCEPTED", "MISSING_OR_DENIED",
           "VERIFY_FAILED", "NO_SPACE", "NOT_WRITABLE", "TRANSFER_FAILED"]

OK = 0
USAGE = 2  #: bad input (unknown subject, sessions out of range, unknown option value)
TERMS_NOT_ACCEPTED = 3  #: the NSD terms were not accepted
MISSING_OR_DENIED = 4  #: a required remote file does not exist or the server refuses it (403)
VERIFY_FAILED = 5  #: size / ETag / sha256 mismatch, a manifest edited by hand, a foreign file in ROOT
NO_SPACE = 6  #: not enough free disk space (checked before the first byte, or the disk filled up)
NOT_WRITABLE = 7  #: the output folder cannot be created or written
TRANSFER_FAILED = 8  #: the server kept failing (drops, 5xx) after every retry, or answered something else than data

#: code -> meaning, for --help and the README
EXIT_CODES: dict[int, str] = {
    OK: "everything planned is present and verified",
    USAGE: "bad input (subject, sessions, option values)",
    TERMS_NOT_ACCEPTED: "NSD terms not accepted (--accept-nsd-terms or BRAIN_DIFFUSER_ACCEPT_NSD_TERMS=1)",
    MISSING_OR_DENIED: "a required remote file is missing or denied (404 / 403)",
    VERIFY_FAILED: "verification failed (size, ETag, sha256, manifest, a foreign file in the output folder)",
    NO_SPACE: "not enough free disk space",
    NOT_WRITABLE: "the output folder cannot be written",
    TRANSFER_FAILED: "the server kept failing, or answered with something other than the file",
}


class DownloadError(Exception):
    """A failure of the download command; ``code`` is the process exit status (see :data:`EXIT_CODES`)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
