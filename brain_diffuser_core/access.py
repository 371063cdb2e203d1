"""Which folders a shared server may open: the presenter's allowed roots (for the app served beyond loopback).

A presenter who starts the app on a lab host (``make run ADDRESS=0.0.0.0``) lets every student who opens the page
type folder paths into the sidebar. Served on loopback only the presenter's own browser can reach it and any
folder opens, as before. Served beyond loopback, bundles and NSD roots open only under the **allowed roots**:

* ``$BRAIN_DIFFUSER_ROOTS`` (folders separated by ``os.pathsep``, ``:`` on Linux) when set;
* else the demo cache (:func:`brain_diffuser_core.config.cache_root`), the shipped demo models
  (``assets/demo/``), the folders given at start (``$BRAIN_DIFFUSER_BUNDLE``, ``$BRAIN_DIFFUSER_NSD_ROOT``) and
  the local model folders named by the start bundle's manifest (the presenter chose that bundle).

What is checked (:func:`check_folder`, :func:`check_bundle_manifest`): the entered path has no ``..`` part; its
real path (symlinks resolved with ``os.path.realpath``) lies under a root's real path; for an NSD root, the
real paths of its ``nsddata*`` top folders too; for a bundle, every file and local model path its
``manifest.json`` names (checked before the bundle is opened, so a crafted manifest cannot make the server probe
other paths either). A refused path gets one message, the same whether it exists or not, naming neither what
exists on the server nor the roots themselves (:data:`REFUSED`). Symlinks deeper inside an allowed NSD tree
(below ``nsddata*/``) are the presenter's own and are not followed up.
"""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .config import cache_root

ROOTS_ENV = "BRAIN_DIFFUSER_ROOTS"
BUNDLE_ENV = "BRAIN_DIFFUSER_BUNDLE"
NSD_ROOT_ENV = "BRAIN_DIFFUSER_NSD_ROOT"
#: the shipped demo assets (trained demo models): always offered by default
DEMO_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
NSD_TOP_FOLDERS = ("nsddata", "nsddata_betas", "nsddata_stimuli")
REFUSED = ("{what} {text!r} cannot be opened on this shared server: it is missing or lies outside the folders "
           "the presenter allowed. Use the demo, or ask the presenter to add the folder to ${env} before starting "
           "the app.")


class AccessError(ValueError):
    """A path the shared server does not open; the message reveals nothing about the server's disk."""


def is_loopback(address: str | None) -> bool:
    """Whether streamlit's ``server.address`` serves loopback only.

    address : the option's value: None or "" (streamlit's default: every interface) -> False; "localhost",
        "127.x.x.x", "::1" (brackets allowed) -> True; any other host or IP -> False.
    """
    text = (address or "").strip().strip("[]").lower()
    if not text:
        return False
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _manifest_model_folders(bundle_folder: str) -> list[Path]:
    """Local model folders (or files) named by a bundle's manifest; [] when it cannot be read."""
    folder = Path(bundle_folder).expanduser()
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for ref in (manifest.get("models") or {}).values() if isinstance(manifest, dict) else ():
        if isinstance(ref, dict) and isinstance(ref.get("path"), str):
            p = Path(ref["path"]).expanduser()
            out.append(p if p.is_absolute() else folder / p)
    return out


def allowed_roots() -> tuple[Path, ...]:
    """Real paths of the allowed roots (see the module docstring), from the environment."""
    env = os.environ
    text = (env.get(ROOTS_ENV) or "").strip()
    if text:
        roots: list = [p for p in text.split(os.pathsep) if p.strip()]
    else:
        roots = [cache_root(), DEMO_ASSETS]
        for name in (BUNDLE_ENV, NSD_ROOT_ENV):
            if (env.get(name) or "").strip():
                roots.append(env[name].strip())
        if (env.get(BUNDLE_ENV) or "").strip():
            roots.extend(_manifest_model_folders(env[BUNDLE_ENV].strip()))
    out: list[Path] = []
    for r in roots:
        real = _real(r)
        if real not in out:
            out.append(real)
    return tuple(out)


def _inside(real: Path, roots: Sequence[Path]) -> bool:
    return any(real == r or real.is_relative_to(r) for r in roots)


def _refuse(what: str, text: str) -> AccessError:
    return AccessError(REFUSED.format(what=what, text=text, env=ROOTS_ENV))


def check_folder(text: str, roots: Sequence[Path], what: str = "'Bundle folder'") -> Path:
    """The real path of an entered folder when it is an existing folder under ``roots``, else AccessError.

    Raises AccessError with a specific message for a ``..`` part (the rule, not the disk), and with
    :data:`REFUSED` (one message for missing, not a folder, or outside the roots, symlinks resolved) otherwise.
    """
    text = (text or "").strip()
    if any(part == ".." for part in Path(text).parts):
        raise AccessError(f"{what} must not contain '..' on this shared server; {text!r} was entered. "
                          "Enter the folder's full path.")
    real = _real(text)
    if not _inside(real, roots) or not real.is_dir():
        raise _refuse(what, text)
    return real


def check_nsd_root(text: str, roots: Sequence[Path]) -> Path:
    """:func:`check_folder` for an NSD root, plus its ``nsddata*`` top folders (a symlink out is refused)."""
    real = check_folder(text, roots, "'NSD root'")
    for name in NSD_TOP_FOLDERS:
        sub = real / name
        if (sub.exists() or sub.is_symlink()) and not _inside(_real(sub), roots):
            raise _refuse("'NSD root'", (text or "").strip())
    return real


def _looks_like_path(ref: str) -> bool:
    """Whether a model reference's ``hf_id`` would be read as a local folder by ``from_pretrained``."""
    # a Hub id is "name" or "org/name"; from_pretrained reads an existing folder of that name first
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or (os.sep != "/" and os.sep in ref) \
        or Path(ref).exists()


def check_bundle_manifest(folder: Path, roots: Sequence[Path], text: str | None = None) -> None:
    """Refuse a bundle folder whose ``manifest.json`` names a file or local model outside ``roots``.

    Checks the ``files`` entries (relative to the folder), every ``models`` ``path`` (absolute, or relative to
    the folder) and any ``hf_id`` that is a local path, all by real path. An unreadable manifest passes (the
    bundle loader then reports it, from inside an allowed folder). The error names the manifest entry (which
    the user can read in the manifest anyway), never where it leads.
    """
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict):
        return
    entries: list[tuple[str, Path]] = []
    files = manifest.get("files")
    for rel in (files if isinstance(files, dict) else {}):
        entries.append((f"file {rel!r}", folder / str(rel)))
    for subj, info in (manifest.get("subjects") or {}).items() if isinstance(manifest.get("subjects"), dict) else ():
        for feat, d in ((info or {}).get("decoders") or {}).items() if isinstance(info, dict) else ():
            if isinstance(d, dict) and isinstance(d.get("file"), str):
                entries.append((f"decoder file of subject {subj} {feat!r}", folder / d["file"]))
    models = manifest.get("models")
    for name, ref in (models.items() if isinstance(models, dict) else ()):
        if not isinstance(ref, dict):
            continue
        for key in ("path", "hf_id"):
            value = ref.get(key)
            if isinstance(value, str) and (key == "path" or _looks_like_path(value)):
                p = Path(value).expanduser()
                entries.append((f"model {name!r} {key} {value!r}", p if p.is_absolute() else folder / p))
    for label, path in entries:
        if not _inside(_real(path), roots):
            raise AccessError(f"'Bundle folder' {text or str(folder)!r} cannot be used on this shared server: its "
                              f"manifest.json's {label} lies outside the folders the presenter allowed. Ask the "
                              f"presenter to add it to ${ROOTS_ENV}, or use the demo.")


class FolderPolicy:
    """What the sidebar may open: everything on loopback, else folders under :func:`allowed_roots`.

    address : streamlit's ``server.address`` (read by the page layer and passed in).
    roots : the allowed roots; default :func:`allowed_roots` of the environment.
    """

    def __init__(self, address: str | None, roots: Iterable[str | os.PathLike] | None = None):
        self.restricted = not is_loopback(address)
        self.roots = tuple(_real(r) for r in roots) if roots is not None else allowed_roots()

    def bundle_folder(self, text: str) -> Path:
        """The folder to open for an entered bundle path (its real path when restricted); AccessError if refused."""
        if not self.restricted:
            return Path((text or "").strip()).expanduser()
        real = check_folder(text, self.roots, "'Bundle folder'")
        check_bundle_manifest(real, self.roots, (text or "").strip())
        return real

    def nsd_root(self, text: str) -> Path:
        """The folder to open for an entered NSD root; AccessError if refused."""
        if not self.restricted:
            return Path((text or "").strip()).expanduser()
        return check_nsd_root(text, self.roots)
