"""The NSD terms of use: printed, explicitly accepted (flag or environment variable) and recorded."""
from __future__ import annotations

import datetime as _dt
import os

from .errors import TERMS_NOT_ACCEPTED, DownloadError

__all__ = ["TERMS_URL", "TERMS_TEXT", "ENV_ACCEPT", "require_acceptance"]

TERMS_URL = "https://cvnlab.slite.page/p/IB6BSeW_7o/Terms-and-Conditions"
ENV_ACCEPT = "BRAIN_DIFFUSER_ACCEPT_NSD_TERMS"
TERMS_TEXT = f"""\
The Natural Scenes Dataset (NSD) is free to download but not free of conditions:
  * research and education only; no redistribution of the data;
  * no attempt to re-identify the participants;
  * fill in the NSD Data Access Agreement form before use.
Terms: {TERMS_URL}
This tool cannot check whether you submitted the Data Access Agreement; accepting here records that you
have read the terms and agree to them."""


def require_acceptance(flag: bool, environ=None) -> dict:
    """Return the acceptance record ``{"accepted_at", "by", "terms_url", "note"}``; raise when not accepted.

    Accepted by ``flag`` (``--accept-nsd-terms``) or ``environ[ENV_ACCEPT] == "1"``.
    """
    environ = os.environ if environ is None else environ
    if flag:
        by = "--accept-nsd-terms"
    elif str(environ.get(ENV_ACCEPT, "")).strip() == "1":
        by = f"{ENV_ACCEPT}=1"
    else:
        raise DownloadError(
            TERMS_NOT_ACCEPTED,
            f"{TERMS_TEXT}\n\nNSD terms not accepted: nothing was downloaded. Read the terms, then re-run with "
            f"--accept-nsd-terms (or set {ENV_ACCEPT}=1).",
        )
    return {
        "accepted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "by": by,
        "terms_url": TERMS_URL,
        "note": "the Data Access Agreement form cannot be checked by this tool",
    }
