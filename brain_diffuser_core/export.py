"""Results out of the app and back in: zips of reconstructions, and evaluation folders read back for display.

Zips (:func:`reconstructions_zip`, :func:`write_reconstructions_zip`)::

    <id>/original.png   (when the item has an original)
    <id>/stage1.png     (stage 1, as fed to stage 2)
    <id>/final.png      (when stage 2 ran)
    manifest.json       {"format", "version", "package_version", "items": [{"id", "files", "seed",
                         "settings", "metrics"}, ...]}

Evaluation folders (written by :func:`brain_diffuser_core.evaluation.evaluate_bundle`) live under
:func:`evaluation_folder` = ``cache_root()/evaluations/<bundle digest>/subj<NN>/<settings digest>`` so that the
same evaluation is computed once; :func:`load_evaluation` reads one back with its per-trial values,
:func:`rank_trials` picks best and worst trials, :func:`comparison_rows` lines our means up with the
published ones. No streamlit here.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .io import atomic_path, to_jsonable

__all__ = ["ZIP_FORMAT", "png_bytes", "reconstructions_zip", "write_reconstructions_zip", "zip_item",
           "bundle_digest", "settings_digest", "evaluation_folder", "EvaluationResults", "load_evaluation",
           "higher_is_better", "rank_trials", "comparison_rows"]

ZIP_FORMAT = "brain-diffuser-explorer/reconstructions"
ZIP_VERSION = 1
IMAGE_FIELDS = ("original", "stage1", "final")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# ------------------------------------------------------------------------------------------------ zips
def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _check_image(item_id: str, name: str, image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"item {item_id!r}: {name!r} must be a uint8 image of shape (H, W, 3); "
                         f"found dtype {arr.dtype} and shape {arr.shape}")
    return arr


def zip_item(image_id: int | str, rec: Any = None, *, original: np.ndarray | None = None,
             stage1: np.ndarray | None = None, final: np.ndarray | None = None, seed: int | None = None,
             settings: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> dict:
    """One zip item, from a :class:`~brain_diffuser_core.pipeline.Reconstruction` ``rec`` (its stage-1 input
    image, final image, seed and settings) and/or explicit fields, which take precedence."""
    item: dict[str, Any] = {"id": str(image_id)}
    if rec is not None:
        item.update(stage1=rec.stage1_upscaled, final=rec.final, seed=rec.seed, settings=dict(rec.settings))
    for name, value in (("original", original), ("stage1", stage1), ("final", final), ("seed", seed),
                        ("settings", settings), ("metrics", metrics)):
        if value is not None:
            item[name] = value
    return item


def reconstructions_zip(items: Iterable[Mapping[str, Any]], *, extra: Mapping[str, Any] | None = None) -> bytes:
    """A zip (bytes) of reconstructions with a ``manifest.json``; see the module docstring for the layout.

    items : mappings with ``"id"`` (73k id or any name of letters, digits, ``_ . -``), ``"stage1"`` (uint8
        (H, W, 3)), optional ``"original"`` and ``"final"`` (uint8 (H, W, 3) or None), ``"seed"`` (int),
        ``"settings"`` and ``"metrics"`` (JSON-able mappings; numpy values are converted).
    extra : more top-level manifest entries (e.g. bundle, subject).
    Raises ValueError naming the item and field for a missing id or stage 1, a bad id, a duplicate id, or an
    image that is not uint8 (H, W, 3).
    """
    from . import __version__

    entries, seen = [], set()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for k, item in enumerate(items):
            if "id" not in item:
                raise ValueError(f"item {k} must have an 'id' (73k id or name); it has keys {sorted(item)}")
            item_id = str(item["id"])
            if not _SAFE_ID.match(item_id):
                raise ValueError(f"item {k}: 'id' must be 1-100 letters, digits, '_', '.' or '-' (not starting "
                                 f"with a dot); {item_id!r} was provided")
            if item_id in seen:
                raise ValueError(f"item {k}: 'id' {item_id!r} appears twice; ids must be unique")
            seen.add(item_id)
            if item.get("stage1") is None:
                raise ValueError(f"item {item_id!r} must have a 'stage1' image; none was provided")
            files = {}
            for name in IMAGE_FIELDS:
                if item.get(name) is None:
                    continue
                image = _check_image(item_id, name, item[name])
                files[name] = f"{item_id}/{name}.png"
                zf.writestr(files[name], png_bytes(image))
            entries.append({"id": item_id, "files": files, "seed": to_jsonable(item.get("seed")),
                            "settings": to_jsonable(dict(item.get("settings") or {})),
                            "metrics": to_jsonable(dict(item.get("metrics") or {}))})
        manifest = {"format": ZIP_FORMAT, "version": ZIP_VERSION, "package_version": __version__,
                    **to_jsonable(dict(extra or {})), "items": entries}
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return buf.getvalue()


def write_reconstructions_zip(items: Iterable[Mapping[str, Any]], path: str | Path, **kw) -> Path:
    """:func:`reconstructions_zip` written atomically to ``path``; returns the path."""
    data = reconstructions_zip(items, **kw)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------ evaluation folders
def _digest(obj: Any, n: int = 16) -> str:
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def bundle_digest(bundle_path: str | Path) -> str:
    """16 hex digits of the sha256 of a bundle's ``manifest.json`` (its decoders' checksums and model refs)."""
    manifest = Path(bundle_path) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"'bundle_path' must be a bundle folder holding manifest.json; {str(manifest)!r} "
                                "does not exist")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def settings_digest(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying evaluation settings (key order does not matter; tuples equal lists)."""
    return _digest(dict(settings))


def evaluation_folder(root: str | Path, bundle_path: str | Path, subject: int, settings: Mapping[str, Any]) -> Path:
    """``<root>/evaluations/<bundle digest>/subj<NN>/<settings digest>`` (``root``: usually ``cache_root()``)."""
    return (Path(root) / "evaluations" / bundle_digest(bundle_path) / f"subj{int(subject):02d}"
            / settings_digest(settings))


@dataclass
class EvaluationResults:
    """An evaluation folder read back.

    summary : {variant: {metric: mean}} (2-way metrics as fractions, distances as distances).
    per_trial : {variant: {metric: float (n,) per-trial values}}, in the order of ``image_ids``.
    image_ids : int (n,) 73k ids of the evaluated test images.
    images : {variant: [Path of each reconstruction PNG]} in the order of ``image_ids``.
    info : the rest of ``metrics.json`` (subject, n_images, rescale, pixel_size, ...).
    """

    folder: Path
    summary: dict[str, dict[str, float]]
    per_trial: dict[str, dict[str, np.ndarray]]
    image_ids: np.ndarray
    images: dict[str, list[Path]]
    info: dict[str, Any]

    @property
    def variants(self) -> list[str]:
        return list(self.summary)

    @property
    def metrics(self) -> list[str]:
        return list(next(iter(self.summary.values()), {}))


def load_evaluation(folder: str | Path) -> EvaluationResults | None:
    """Read ``metrics.json`` + ``per_image.csv`` of an evaluation folder; None when it is not complete yet.

    Raises ValueError naming the file when the two disagree (variants, or a variant without per-trial rows).
    """
    folder = Path(folder)
    mpath, ppath = folder / "metrics.json", folder / "per_image.csv"
    if not (mpath.is_file() and ppath.is_file()):
        return None
    info = json.loads(mpath.read_text())
    summary = {v: {m: float(x) for m, x in s.items()} for v, s in info.pop("summary").items()}
    rows: dict[str, list[dict[str, str]]] = {}
    with open(ppath, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["variant"], []).append(row)
    if set(rows) != set(summary):
        raise ValueError(f"{ppath} must hold per-trial rows of the variants in metrics.json {sorted(summary)}; "
                         f"it holds {sorted(rows)}")
    ids = None
    per_trial: dict[str, dict[str, np.ndarray]] = {}
    for variant, vrows in rows.items():
        vids = np.array([int(r["image_id"]) for r in vrows])
        if ids is None:
            ids = vids
        elif not np.array_equal(ids, vids):
            raise ValueError(f"{ppath}: variant {variant!r} lists other image ids than the first variant")
        per_trial[variant] = {m: np.array([float(r[m]) for r in vrows]) for m in summary[variant]}
    images = {v: [folder / "images" / v / f"{int(i)}.png" for i in ids] for v in summary}
    return EvaluationResults(folder, summary, per_trial, ids, images, info)


def higher_is_better(metric: str) -> bool:
    """False for correlation-distance columns (a registered network whose metric is "distance"), else True."""
    from .metrics import registered_networks

    for spec in registered_networks():
        if metric in (spec.label, spec.paper_column):
            return spec.metric != "distance"
    return metric not in ("EffNet-B", "SwAV")


def rank_trials(values: Sequence[float], k: int, *, best: bool = True, higher: bool = True) -> list[int]:
    """Indices of the ``k`` best (or worst) entries of per-trial ``values`` (float (n,)), best first for
    ``best``, worst first otherwise; ``higher`` says whether a higher value is better. Ties keep index order;
    NaNs are never picked."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"'values' must be one value per trial, shape (n,); shape {v.shape} was provided")
    if k < 0:
        raise ValueError(f"'k' must be >= 0; {k} was provided")
    finite = np.flatnonzero(np.isfinite(v))
    score = v[finite] if higher else -v[finite]
    if not best:
        score = -score
    order = finite[np.argsort(-score, kind="stable")]
    return [int(i) for i in order[:k]]


#: published rows shown beside ours in the charts (PAPER_TABLE keys)
CHART_PAPER_ROWS = ("Brain-Diffuser", "Brain-Diffuser subj 1, full", "Brain-Diffuser subj 1, only VDVAE")


def comparison_rows(summary: Mapping[str, Mapping[str, float]], *, label: str = "ours",
                    paper_rows: Sequence[str] = CHART_PAPER_ROWS) -> list[dict[str, Any]]:
    """Long-form rows for charts: our means per variant next to the published values of the same column.

    summary : {variant: {metric label: mean}} as :func:`evaluate_bundle` returns.
    Returns [{"metric", "method", "value", "source" ("ours"/"published"), "comparable" (bool)}]; a
    stand-in network's label (e.g. "EffNet-Lite0") is compared with its paper column (e.g. "EffNet-B") with
    ``comparable`` False. Metrics without a paper column get our rows only.
    """
    from .metrics import PAPER_TABLE, SSIM_COLUMNS_LABEL, registered_networks

    column_of = {s.label: (s.paper_column, not s.stand_in) for s in registered_networks() if s.paper_column}
    out: list[dict[str, Any]] = []
    metrics = list(dict.fromkeys(m for s in summary.values() for m in s))
    if SSIM_COLUMNS_LABEL in metrics:  # our "SSIM" is then true 2-D SSIM; the published one is column-wise
        column_of.update({"SSIM": ("SSIM", False), SSIM_COLUMNS_LABEL: ("SSIM", True)})
    for metric in metrics:
        for variant, s in summary.items():
            if metric in s:
                out.append({"metric": metric, "method": f"{label} ({variant})", "value": float(s[metric]),
                            "source": "ours", "comparable": True})
        column, comparable = column_of.get(metric, (metric, True))
        for row in paper_rows:
            value = PAPER_TABLE.get(row, {}).get(column)
            if value is not None:
                out.append({"metric": metric, "method": row, "value": float(value), "source": "published",
                            "comparable": comparable})
    return out
