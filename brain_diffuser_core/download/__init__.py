"""Get NSD and the real weights: planned, resumable, verified, offline-checkable.

==================  ===========================================================================================
module              responsibility
==================  ===========================================================================================
``plan``            NSD keys for a subject, session checks, sizes, free space, the plan table
``transfer``        the one resumable transfer loop (``.part`` + state, Range, If-Match, retries, checks, rename)
``s3``              NSD's bucket via boto3, unsigned
``http``            plain HTTP(S) files and the Hugging Face hub's tree + resolve routes
``stimuli``         only the images a subject saw, by exact Range reads from the remote HDF5
``manifest``        one entry per finished file (sha256), offline :func:`verify`
``terms``           the NSD terms: printed, accepted explicitly, recorded
``run``             running a plan: :func:`download_nsd`, :func:`download_weights`
==================  ===========================================================================================

Command line: ``python -m brain_diffuser_core download nsd|weights|verify --help``.
"""
from __future__ import annotations

from .errors import EXIT_CODES, DownloadError
from .manifest import MANIFEST_NAME, verify

__all__ = ["DownloadError", "EXIT_CODES", "MANIFEST_NAME", "verify", "missing_data_hint"]


def missing_data_hint(nsd_root, subject: int, error: Exception) -> str:
    """The message for a folder whose NSD root lacks a file a page needs: the error and the command that
    fetches the subject's files into that root."""
    return (f"{error}\n\nThis NSD root lacks files subject {int(subject)} needs. Fetch them with:\n"
            f"    python -m brain_diffuser_core download nsd --subject {int(subject)} --out {nsd_root} "
            "--accept-nsd-terms\n"
            "(add --dry-run first to see every file and the total size; a re-run only fetches what is missing).")
