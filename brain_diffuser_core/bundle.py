"""Decoder bundles: a folder holding every fitted ridge decoder plus a manifest. No pickle anywhere.

Layout::

    bundle/
      manifest.json                  format_version, created, package versions, subjects, features, models, files
      subj01_vdvae.safetensors       RidgeDecoder.state_dict() of one (subject, feature)
      subj01_clip_text.safetensors
      ...
      <extra files>                  optional, e.g. small model weights referenced by relative path

``manifest.json``::

    {"format_version": 3, "created": "2026-11-24T21:00:00+00:00",
     "packages": {"python": "3.11.9", "torch": "2.13.0", ...},
     "features": {"vdvae": {"shape": [91168]}, "clip_text": {"shape": [77, 768]}, ...},
     "subjects": {"1": {"n_voxels": 15724, "mask_sha256": "...", "n_train": 8859,
                        "decoders": {"vdvae": {"file": "subj01_vdvae.safetensors", "alpha": 50000.0, "rank": null,
                                               "form": "dual", "dtype": "float16", "rescale": ["train", "paper", "none"],
                                               "rescale_tensors": ["y_mean", "y_std", "loo_mean", "loo_std"],
                                               "train_feature_norm": 123.4, "target_axes": 64}, ...}}},
     "models": {"vdvae": {"path": "models/vdvae.th", "sha256": "..."}, "clip": {"hf_id": "openai/..."}, ...},
     "files": {"subj01_vdvae.safetensors": "<sha256>", ...}}

``form`` is how the weights are stored (:class:`~brain_diffuser_core.ridge.RidgeDecoder`: "primal", "lowrank"
or "dual"). Format 2 added the dual form; format-1 bundles (primal or low rank only) are read as they are.
Format 3 added ``target_axes``: the number of principal axes of the training targets each decoder file keeps
(:meth:`~brain_diffuser_core.ridge_decoder.RidgeDecoder.target_sd_along`: how far training features spread
along a direction, the scale of the ROI-optimal features); format 1-2 decoders have none.

``train_feature_norm`` is the mean Euclidean norm of one training sample's feature vector (for information).
Model paths may be relative to the bundle folder.

Writing is atomic (a temporary folder renamed into place); updating a bundle with a new subject keeps the
others (their files are copied and their checksums verified). Reading checks the manifest, the presence and
size of every file at once, and a file's sha256 when its decoder is first loaded (or all at once with
``verify="eager"``); problems raise :class:`BundleError` naming the file, subject or feature.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .config import FEATURE_NAMES
from .io import atomic_dir, sha256_file
from .ridge import RidgeDecoder

__all__ = ["FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "BundleError", "SubjectDecoders", "Bundle", "save_bundle",
           "load_bundle", "decoder_filename"]

#: what this code writes; 2 added the dual-form decoders (``form`` in the manifest); 3 the principal axes of each
#: decoder's training targets (``target_axes``: the scale of ROI-optimal features)
FORMAT_VERSION = 3
#: what this code reads (format 1-2 decoders have no principal axes: ROI features fall back to scale "train")
READABLE_FORMAT_VERSIONS = (1, 2, 3)
_PACKAGES = ("torch", "numpy", "safetensors", "scipy", "diffusers", "transformers")
_MODEL_KEYS = ("path", "hf_id", "sha256")


class BundleError(ValueError):
    """A bundle is missing a piece, is corrupt (checksum mismatch) or does not match the data given to it."""


@dataclass
class SubjectDecoders:
    """What :func:`save_bundle` needs for one subject.

    decoders : feature name -> fitted :class:`RidgeDecoder` (n_features must equal ``n_voxels``).
    train_feature_norm : feature name -> mean Euclidean norm of a training sample's features.
    """

    n_voxels: int
    mask_sha256: str
    decoders: Mapping[str, RidgeDecoder]
    train_feature_norm: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)


def decoder_filename(subject: int, feature: str) -> str:
    return f"subj{int(subject):02d}_{feature}.safetensors"


def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        from . import __version__

        out["brain_diffuser_core"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _check_models(models: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, ref in (models or {}).items():
        if not isinstance(ref, Mapping) or not ({"path", "hf_id"} & set(ref)):
            raise BundleError(f"model reference {name!r} must be a mapping with 'path' or 'hf_id'; {ref!r} was provided")
        extra = set(ref) - set(_MODEL_KEYS)
        if extra:
            raise BundleError(f"model reference {name!r} has unknown keys {sorted(extra)}; allowed {list(_MODEL_KEYS)}")
        out[str(name)] = {k: str(v) for k, v in ref.items()}
    return out


# -------------------------------------------------------------------------------------------------- save
def save_bundle(
    path: str | os.PathLike,
    subjects: Mapping[int, SubjectDecoders],
    *,
    feature_shapes: Mapping[str, tuple[int, ...]],
    models: Mapping[str, Mapping[str, Any]] | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    update: bool = False,
) -> Path:
    """Write a bundle folder atomically; returns its path.

    Parameters
    ----------
    subjects : subject number -> :class:`SubjectDecoders`.
    feature_shapes : feature name -> per-image shape, e.g. ``{"clip_text": (77, 768)}``.
    models : generative model references, ``{"vdvae": {"path": ... or "hf_id": ..., "sha256": ...}, ...}``.
    extra_files : relative path inside the bundle -> source file to copy in (checksummed like the rest).
    update : if True and ``path`` already holds a bundle, keep its subjects not given here (and its models,
        extra files and feature shapes, which must agree with the new ones); for a subject given here, keep
        its existing decoders of other features (files carried over unchanged) when its voxel count and mask
        checksum are unchanged, else drop them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    shapes = {str(k): tuple(int(s) for s in v) for k, v in feature_shapes.items()}
    models_out = _check_models(models)
    old: Bundle | None = None
    if update and (path / "manifest.json").exists():
        old = load_bundle(path, verify="eager")
        for name, shp in old.manifest["features"].items():
            if name in shapes and tuple(shp["shape"]) != shapes[name]:
                raise BundleError(
                    f"feature {name!r} has shape {tuple(shp['shape'])} in the existing bundle {path}; "
                    f"the update gives {shapes[name]}"
                )
            shapes.setdefault(name, tuple(shp["shape"]))
        models_out = {**old.manifest.get("models", {}), **models_out}

    # 1. Check inputs
    for subj, entry in subjects.items():
        for feat, dec in entry.decoders.items():
            if feat not in shapes:
                raise BundleError(f"subject {subj} has a decoder for {feat!r}, which is not in 'feature_shapes' {sorted(shapes)}")
            n_t = int(np.prod(shapes[feat]))
            if dec.n_targets != n_t:
                raise BundleError(
                    f"decoder (subject {subj}, {feat!r}) predicts {dec.n_targets} values; feature shape "
                    f"{shapes[feat]} needs {n_t}"
                )
            if dec.n_features != int(entry.n_voxels):
                raise BundleError(
                    f"decoder (subject {subj}, {feat!r}) takes {dec.n_features} voxels; subject {subj} has {entry.n_voxels}"
                )

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "packages": _package_versions(),
        "features": {k: {"shape": list(v)} for k, v in shapes.items()},
        "subjects": {},
        "models": models_out,
        "files": {},
    }
    with atomic_dir(path) as tmp:
        # 2. carry over what the existing bundle holds and the update does not replace
        if old is not None:
            for key, info in old.manifest["subjects"].items():
                if int(key) in {int(s) for s in subjects}:
                    continue
                manifest["subjects"][key] = info
                for dinfo in info["decoders"].values():
                    _copy_in(old.path / dinfo["file"], tmp / dinfo["file"])
            for rel, digest in old.manifest["files"].items():
                if rel in old._extra_files():
                    _copy_in(old.path / rel, tmp / rel)
        # 3. new subjects
        for subj, entry in sorted(subjects.items()):
            decoders = {}
            prev = old.manifest["subjects"].get(str(int(subj))) if old is not None else None
            if prev is not None and (prev["n_voxels"], prev["mask_sha256"]) == (int(entry.n_voxels), str(entry.mask_sha256)):
                for feat, dinfo in prev["decoders"].items():
                    if feat not in entry.decoders:
                        _copy_in(old.path / dinfo["file"], tmp / dinfo["file"])
                        decoders[feat] = dinfo
            for feat, dec in entry.decoders.items():
                fname = decoder_filename(subj, feat)
                save_file(dec.state_dict(), str(tmp / fname), metadata={"subject": str(subj), "feature": feat})
                decoders[feat] = {
                    "file": fname,
                    "alpha": dec.alpha,
                    "rank": dec.rank,
                    "form": dec.form,
                    "dtype": dec.weight_dtype,
                    "rescale": ["train", "paper", "none"] if dec.has_loo_stats else ["paper", "none"],
                    # per-target rescaling statistics, (n_targets,) float32 tensors inside the decoder file
                    "rescale_tensors": [k for k in ("y_mean", "y_std", "loo_mean", "loo_std") if k in dec.tensors],
                    "train_feature_norm": (float(entry.train_feature_norm[feat])
                                           if feat in entry.train_feature_norm else None),
                    # principal axes of the training targets kept in the file (0: none, a format <= 2 fit)
                    "target_axes": int(dec.tensors["target_axes"].shape[1]) if dec.has_target_axes else 0,
                }
            manifest["subjects"][str(int(subj))] = {
                "n_voxels": int(entry.n_voxels),
                "mask_sha256": str(entry.mask_sha256),
                "n_train": int(next(iter(entry.decoders.values())).n_train) if entry.decoders else 0,
                "decoders": decoders,
                **{k: v for k, v in dict(entry.info).items() if k not in ("n_voxels", "mask_sha256", "decoders")},
            }
        # 4. extra files
        for rel, src in (extra_files or {}).items():
            relp = Path(rel)
            if relp.is_absolute() or ".." in relp.parts or rel == "manifest.json":
                raise BundleError(f"extra file name {rel!r} must be a relative path inside the bundle")
            _copy_in(Path(src), tmp / relp)
        # 5. checksums of every file, then the manifest
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            if rel != "manifest.json":
                manifest["files"][rel] = sha256_file(f)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _copy_in(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():  # never write through a hard link into another bundle's file
        dst.unlink()
    try:
        os.link(src, dst)  # same file system: no copy of gigabytes
    except OSError:
        shutil.copy2(src, dst)


# -------------------------------------------------------------------------------------------------- load
class Bundle:
    """A loaded bundle; decoders are read lazily (see :func:`load_bundle`)."""

    def __init__(self, path: Path, manifest: dict, verify: str):
        self.path = path
        self.manifest = manifest
        self._verify = verify
        self._verified: set[str] = set()
        self._decoders: dict[tuple[int, str], RidgeDecoder] = {}

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, subjects={self.subjects}, features={self.features})"

    @property
    def subjects(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["subjects"])

    @property
    def features(self) -> list[str]:
        """Feature names, pipeline order (:data:`FEATURE_NAMES`) first, then any others sorted."""
        names = set(self.manifest["features"])
        return [f for f in FEATURE_NAMES if f in names] + sorted(names - set(FEATURE_NAMES))

    @property
    def models(self) -> dict[str, dict[str, str]]:
        """Model references; relative ``path`` entries are resolved against the bundle folder."""
        out = {}
        for name, ref in self.manifest.get("models", {}).items():
            ref = dict(ref)
            if "path" in ref and not Path(ref["path"]).is_absolute():
                ref["path"] = str((self.path / ref["path"]).resolve())
            out[name] = ref
        return out

    def clip_location(self) -> str | None:
        """Where the CLIP towers for this bundle's features live: the ``clip`` model reference, else the
        Versatile Diffusion folder (its text/image encoders); a local path or a Hugging Face id, or None."""
        models = self.models
        ref = models.get("clip") or models.get("versatile_diffusion")
        if ref is None:
            return None
        return ref.get("path") or ref.get("hf_id")

    def feature_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.manifest["features"]:
            raise BundleError(f"'feature' must be one of {self.features}; {name!r} was provided")
        return tuple(self.manifest["features"][name]["shape"])

    def subject_info(self, subject: int) -> dict[str, Any]:
        key = str(int(subject))
        if key not in self.manifest["subjects"]:
            raise BundleError(f"'subject' must be one of {self.subjects} (in bundle {self.path}); {subject} was provided")
        return self.manifest["subjects"][key]

    def train_feature_norm(self, subject: int, feature: str) -> float | None:
        return self._decoder_info(subject, feature).get("train_feature_norm")

    def check_subject(self, subject: int, n_voxels: int, mask_sha256: str) -> None:
        """Raise :class:`BundleError` unless fMRI with this voxel count and mask suits the subject's decoders."""
        info = self.subject_info(subject)
        if int(n_voxels) != int(info["n_voxels"]):
            raise BundleError(
                f"subject {subject}: the bundle's decoders take {info['n_voxels']} voxels; the data has {n_voxels}"
            )
        if str(mask_sha256) != str(info["mask_sha256"]):
            raise BundleError(
                f"subject {subject}: voxel mask checksum differs (bundle {info['mask_sha256'][:12]}..., data "
                f"{str(mask_sha256)[:12]}...): the voxels are not the ones the decoders were fitted on"
            )

    def _decoder_info(self, subject: int, feature: str) -> dict[str, Any]:
        info = self.subject_info(subject)
        if feature not in info["decoders"]:
            raise BundleError(
                f"subject {subject} has no decoder for {feature!r}; it has {sorted(info['decoders'])}"
            )
        return info["decoders"][feature]

    def _extra_files(self) -> set[str]:
        dec = {d["file"] for s in self.manifest["subjects"].values() for d in s["decoders"].values()}
        return set(self.manifest["files"]) - dec

    def verify_file(self, rel: str) -> None:
        """Check one file's sha256 against the manifest (once)."""
        if rel in self._verified:
            return
        f = self.path / rel
        if not f.exists():
            raise BundleError(f"bundle {self.path} is missing {rel}")
        if sha256_file(f) != self.manifest["files"][rel]:
            if self._manifest_on_disk_changed():
                raise BundleError(f"bundle {self.path} was replaced after it was opened (rebuilt by another process?): "
                                  f"{rel} no longer belongs to the manifest read then; open the bundle again")
            raise BundleError(f"bundle file {rel} is corrupt: its sha256 differs from the manifest's")
        self._verified.add(rel)

    def _manifest_on_disk_changed(self) -> bool:
        try:
            return json.loads((self.path / "manifest.json").read_text()) != self.manifest
        except (OSError, ValueError):
            return True

    def decoder(self, subject: int, feature: str) -> RidgeDecoder:
        """The :class:`RidgeDecoder` of (subject, feature), read on first use and then kept."""
        key = (int(subject), feature)
        if key in self._decoders:
            return self._decoders[key]
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        info = self._decoder_info(subject, feature)
        rel = info["file"]
        if self._verify != "none":
            self.verify_file(rel)
        try:
            dec = RidgeDecoder.from_state_dict(load_file(str(self.path / rel)))
        except (SafetensorError, ValueError, OSError) as err:
            raise BundleError(f"bundle file {rel} cannot be read as a decoder: {err}") from None
        n_vox = int(self.subject_info(subject)["n_voxels"])
        n_t = int(np.prod(self.feature_shape(feature)))
        if dec.n_features != n_vox or dec.n_targets != n_t:
            raise BundleError(
                f"bundle file {rel} maps {dec.n_features} voxels to {dec.n_targets} values; the manifest says "
                f"{n_vox} voxels and feature shape {self.feature_shape(feature)} ({n_t} values)"
            )
        self._decoders[key] = dec
        return dec


def load_bundle(path: str | os.PathLike, *, verify: str = "lazy") -> Bundle:
    """Open a bundle folder.

    ``verify``: "lazy" (default: sizes/presence now, a file's sha256 when its decoder is first loaded),
    "eager" (every sha256 now) or "none".
    """
    if verify not in ("lazy", "eager", "none"):
        raise ValueError(f"'verify' must be one of ['lazy', 'eager', 'none']; {verify!r} was provided")
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist")
    if not mpath.exists():
        raise BundleError(f"bundle {path} has no manifest.json")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"bundle {path}: manifest.json is not valid JSON ({err})") from None
    missing_keys = [k for k in ("format_version", "features", "subjects", "files") if k not in manifest]
    if missing_keys:
        raise BundleError(f"bundle {path}: manifest.json lacks {missing_keys}")
    if manifest["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise BundleError(
            f"bundle {path} has format_version {manifest['format_version']}; this code reads "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))} (a newer version of brain_diffuser_core wrote it: "
            "upgrade, or refit the decoders with this one)"
        )
    for subj, info in manifest["subjects"].items():
        for feat, d in info.get("decoders", {}).items():
            if feat not in manifest["features"]:
                raise BundleError(f"bundle {path}: subject {subj} has a decoder for {feat!r}, not listed in 'features'")
            if d.get("file") not in manifest["files"]:
                raise BundleError(f"bundle {path}: decoder file of subject {subj} {feat!r} is not checksummed in 'files'")
    missing = [rel for rel in manifest["files"] if not (path / rel).is_file()]
    if missing:
        raise BundleError(f"bundle {path} is missing files: {missing}")
    bundle = Bundle(path, manifest, verify)
    if verify == "eager":
        for rel in manifest["files"]:
            bundle.verify_file(rel)
    return bundle
