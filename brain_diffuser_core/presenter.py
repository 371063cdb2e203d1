"""The presenter of a lab meeting and what students follow: one server-wide stage, no streamlit here.

Who presents (:func:`is_presenter`)
    * ``$BRAIN_DIFFUSER_PRESENTER_TOKEN`` set: the session whose sidebar holds that token (compared in constant
      time). Choose a long random one, e.g. ``python -c "import secrets; print(secrets.token_urlsafe(16))"``,
      and tell no student.
    * no token and served on loopback only: every session (only the presenter's own machine can reach it).
    * no token and served beyond loopback: nobody (students cannot make themselves presenter).

What is shared (:class:`Stage`)
    Per scene (the app's frame, the walkthrough, the ROI designer), the presenter's latest widget values and its
    latest result with the key it was computed for. A following session applies the values to its own widgets,
    and any session whose own result key equals the presenter's shows the presenter's result instead of running
    the same generation again: thirty followers, one generation. Each scene keeps one result (bounded memory).
"""
from __future__ import annotations

import hmac
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

TOKEN_ENV = "BRAIN_DIFFUSER_PRESENTER_TOKEN"


def presenter_token() -> str:
    """``$BRAIN_DIFFUSER_PRESENTER_TOKEN`` stripped ("" when unset)."""
    return os.environ.get(TOKEN_ENV, "").strip()


def is_presenter(entered: str | None, *, loopback: bool, token: str | None = None) -> bool:
    """Whether a session presents (rules in the module docstring).

    entered : the token typed in this session's sidebar ("" or None: none).
    loopback : whether the server listens on loopback only (:func:`brain_diffuser_core.access.is_loopback`).
    token : the server's token; default :func:`presenter_token`.
    """
    token = presenter_token() if token is None else token.strip()
    if token:
        return hmac.compare_digest((entered or "").strip().encode(), token.encode())
    return bool(loopback)


@dataclass(frozen=True)
class Scene:
    """One scene of the stage: version (int, +1 per change), values ({widget key: value}), result_key and
    result (the presenter's latest result and what it was computed for, or None), updated (time.time())."""

    version: int = 0
    values: Mapping[str, Any] = field(default_factory=dict)
    result_key: Hashable | None = None
    result: Any = None
    updated: float = 0.0


class Stage:
    """Server-wide presenter state, shared by every session's thread (one per server process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._scenes: dict[str, Scene] = {}

    def scene(self, name: str) -> Scene:
        """The scene ``name`` now (an empty Scene of version 0 before the presenter has shown it)."""
        with self._lock:
            return self._scenes.get(name, Scene())

    def version(self, name: str) -> int:
        return self.scene(name).version

    def publish(self, name: str, values: Mapping[str, Any]) -> int:
        """Set the presenter's values of scene ``name`` (a copy); the version changes only when they do."""
        values = dict(values)
        with self._lock:
            old = self._scenes.get(name, Scene())
            if old.version and dict(old.values) == values:
                return old.version
            self._scenes[name] = Scene(old.version + 1, values, old.result_key, old.result, time.time())
            return old.version + 1

    def publish_result(self, name: str, key: Hashable, result: Any) -> int:
        """Make ``result`` (computed for ``key``) the presenter's latest of scene ``name``, replacing the last."""
        with self._lock:
            old = self._scenes.get(name, Scene())
            self._scenes[name] = Scene(old.version + 1, old.values, key, result, time.time())
            return old.version + 1

    def result(self, name: str, key: Hashable) -> Any:
        """The presenter's result of scene ``name`` if it was computed for ``key``, else None."""
        s = self.scene(name)
        return s.result if s.result_key is not None and s.result_key == key else None
