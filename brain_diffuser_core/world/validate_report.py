"""The report of ``world validate``: :class:`ValidationReport` (per-seed records, per (roi, subject) summary,
the aims computed from the numbers, the printed table) and its files (report.json, per_seed.csv, summary.csv,
one contact sheet PNG per ROI). Scoring itself is in :mod:`.validate`; the image measures in :mod:`.measures`.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_path, atomic_write_json, to_jsonable
from ..rois import roi_names
from .measures import CONTRAST_SIGMA_DEG, HF_CUTOFF_CPD, differential_contrast_centroids
from .scenes import FIELD_DEG, IMAGE_SIZE
from .validate_judges import CATEGORY_ROIS, DECODED_FEATURES, JUDGES

__all__ = ["ECCENTRICITY_ROIS", "NOT_AVAILABLE", "ValidationReport"]

#: the five NSD eccentricity bands, inner to outer
ECCENTRICITY_ROIS: tuple[str, ...] = tuple(roi_names("eccentricity"))
#: summary value when the decoder-level check could not run (the bundle's CLIP did not load)
NOT_AVAILABLE = "n/a"


@dataclass
class ValidationReport:
    """Scores of ROI-optimal scenes.

    records : one dict per generated image: roi, subject ("subj01" ... or "average"), seed, key,
        observer (judged category), clip (judged category or None), preferred (the ROI's preferred category
        or None), hf_fraction, colourfulness, ecc_centroid_deg.
    images : (roi, subject label) -> uint8 (n_seeds, H, W, 3) the generated images (not serialised).
    n_voxels : (roi, subject label) -> voxels in the ROI (summed over subjects for the average).
    decoded : (roi, subject label) -> {"clip_text": category, "clip_vision": category}, the decoder-level
        check (:class:`DecodedCategoryCheck`); absent when the bundle's CLIP did not load.
    """

    rois: list[str]
    subjects: list[str]
    n_seeds: int
    judge: str
    records: list[dict] = field(default_factory=list)
    images: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    n_voxels: dict[tuple[str, str], int] = field(default_factory=dict)
    decoded: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    clip_note: str = ""
    decoded_note: str = ""
    independent_note: str = ""
    models_trained: bool | None = None
    settings: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ summaries
    def _rows(self, roi: str, subject: str) -> list[dict]:
        return [r for r in self.records if r["roi"] == roi and r["subject"] == subject]

    def summary(self) -> list[dict]:
        """One dict per (roi, subject): n, voxels, preferred fractions by judge, the decoder-level categories
        (``decoded_text_category``, ``decoded_vision_category``: a category or "n/a";
        ``decoded_text_is_preferred``: bool for category ROIs, else None), mean image measures."""
        out = []
        for roi in self.rois:
            for subj in self.subjects:
                rows = self._rows(roi, subj)
                if not rows:
                    continue
                pref = rows[0]["preferred"]
                row = {"roi": roi, "subject": subj, "n": len(rows), "n_voxels": self.n_voxels.get((roi, subj)),
                       "preferred": pref}
                others = [r for r in self.records if r["subject"] == subj and r["roi"] != roi]
                for j in JUDGES:
                    vals = [r.get(j) for r in rows if r.get(j) is not None]
                    row[f"{j}_preferred_fraction"] = (float(np.mean([v == pref for v in vals]))
                                                      if pref is not None and vals else None)
                    # the same judge on the other ROIs' scenes: how often it says this category anyway
                    ovals = [r.get(j) for r in others if r.get(j) is not None]
                    row[f"{j}_other_rois_fraction"] = (float(np.mean([v == pref for v in ovals]))
                                                       if pref is not None and ovals else None)
                    row[f"{j}_counts"] = {c: sum(v == c for v in vals) for c in sorted(set(vals))} if vals else {}
                dec = self.decoded.get((roi, subj), {})
                for feat, col in DECODED_FEATURES.items():
                    row[col] = dec.get(feat) or NOT_AVAILABLE
                text = row["decoded_text_category"]
                row["decoded_text_is_preferred"] = (text == pref if pref is not None and text != NOT_AVAILABLE
                                                    else None)
                for m in ("hf_fraction", "colourfulness", "ecc_centroid_deg"):
                    v = np.array([r[m] for r in rows], np.float64)
                    row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else None
                    row[m + "_sd"] = float(np.nanstd(v)) if np.isfinite(v).any() else None
                out.append(row)
        return out

    def aims(self) -> list[dict]:
        """Each aim of the issue checked per subject label from the numbers: {aim, subject, value, target, met}."""
        summ = {(r["roi"], r["subject"]): r for r in self.summary()}
        out = []
        key = f"{self.judge}_preferred_fraction"
        for subj in self.subjects:
            for roi in CATEGORY_ROIS:
                r = summ.get((roi, subj))
                if r is None:
                    continue
                if r[key] is not None:
                    out.append({"aim": f"{roi}: >= 80% {CATEGORY_ROIS[roi]} scenes ({self.judge} judge) over >= 16 "
                                       "seeds",
                                "subject": subj, "value": r[key], "target": 0.8,
                                "other_rois_fraction": r[f"{self.judge}_other_rois_fraction"],
                                "category": CATEGORY_ROIS[roi],
                                "met": bool(r[key] >= 0.8 and r["n"] >= 16)})
                if r["decoded_text_is_preferred"] is not None:
                    out.append({"aim": f"{roi}: decoded CLIP-text features nearest the {CATEGORY_ROIS[roi]} "
                                       "centroid (decoder level)",
                                "subject": subj, "value": r["decoded_text_category"],
                                "target": CATEGORY_ROIS[roi], "met": bool(r["decoded_text_is_preferred"])})
            v1, v4 = summ.get(("V1", subj)), summ.get(("V4", subj))
            if v1 and v4 and v1["hf_fraction"] is not None and v4["hf_fraction"] is not None:
                out.append({"aim": "V1 scenes carry more high-frequency energy than V4 scenes", "subject": subj,
                            "value": {"V1": v1["hf_fraction"], "V4": v4["hf_fraction"]}, "target": "V1 > V4",
                            "met": bool(v1["hf_fraction"] > v4["hf_fraction"])})
            bands = [summ[(b, subj)]["ecc_centroid_deg"] for b in ECCENTRICITY_ROIS
                     if (b, subj) in summ and summ[(b, subj)]["ecc_centroid_deg"] is not None]
            if len(bands) >= 2:
                out.append({"aim": "contrast centroid moves outward band by band", "subject": subj,
                            "value": bands, "target": "strictly increasing",
                            "met": bool(all(b > a for a, b in zip(bands, bands[1:])))})
            band_images = {b: self.images[(b, subj)] for b in ECCENTRICITY_ROIS if (b, subj) in self.images}
            if len(band_images) >= 2:
                diff = list(differential_contrast_centroids(band_images).values())
                out.append({"aim": "differential contrast centroid (band minus a fitted multiple of the bands' mean, "
                                   "over seeds) moves outward band by band", "subject": subj, "value": diff,
                            "target": "strictly increasing",
                            "met": bool(np.all(np.isfinite(diff)) and all(b > a for a, b in zip(diff, diff[1:])))})
        return out

    # ------------------------------------------------------------------ output
    def format_table(self) -> str:
        """The printed table: one line per (roi, subject), then the aims."""
        def f(v, fmt):
            return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

        head = (f"{'roi':<8} {'subject':<8} {'n':>3} {'voxels':>6} {'pref':<6} {'indep':>6} {'observer':>8} {'clip':>6} "
                f"{'dec text':<8} {'dec vis':<8} {'HF frac':>8} {'colour':>7} {'ecc deg':>7}")
        lines = [head, "-" * len(head)]
        for r in self.summary():
            lines.append(f"{r['roi']:<8} {r['subject']:<8} {r['n']:>3} {f(r['n_voxels'], 'd'):>6} "
                         f"{r['preferred'] or '-':<6} {f(r['independent_preferred_fraction'], '.0%'):>6} "
                         f"{f(r['observer_preferred_fraction'], '.0%'):>8} "
                         f"{f(r['clip_preferred_fraction'], '.0%'):>6} {r['decoded_text_category']:<8} "
                         f"{r['decoded_vision_category']:<8} {f(r['hf_fraction'], '.3f'):>8} "
                         f"{f(r['colourfulness'], '.1f'):>7} {f(r['ecc_centroid_deg'], '.2f'):>7}")
        lines.append("dec text / dec vis: category nearest to the decoded CLIP-text / CLIP-vision features of the ROI "
                     "pattern (decoder level, before generation; n/a without the bundle's CLIP)")
        lines.append("")
        lines.append("aims (computed from the numbers above):")
        for a in self.aims():
            v = a["value"]
            if isinstance(v, float):
                vs = f"{v:.0%}"
                o = a.get("other_rois_fraction")
                if o is not None:
                    vs += f" (other ROIs' scenes judged {a['category']}: {o:.0%})"
            elif isinstance(v, str):
                vs = f"nearest {v}"
            elif isinstance(v, dict):
                vs = ", ".join(f"{k} {x:.3f}" for k, x in v.items())
            else:
                vs = " -> ".join(f"{x:.2f}" for x in v) + " deg"
            lines.append(f"  [{'MET' if a['met'] else 'not met'}] {a['subject']:<8} {a['aim']}: {vs}")
        if self.independent_note:
            lines.append(f"independent judge: {self.independent_note}")
        if self.clip_note:
            lines.append(f"clip judge: {self.clip_note}")
        if self.decoded_note:
            lines.append(f"decoder-level check: {self.decoded_note}")
        if self.models_trained is False:
            lines.append("NOTE: the bundle's generative models are UNTRAINED random demo models: these numbers "
                         "say nothing about Brain-Diffuser; train them with `world train`.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"rois": self.rois, "subjects": self.subjects, "n_seeds": self.n_seeds, "judge": self.judge,
                "models_trained": self.models_trained, "clip_note": self.clip_note,
                "independent_note": self.independent_note,
                "decoded_note": self.decoded_note, "settings": self.settings,
                "rules": {"hf_cutoff_cpd": HF_CUTOFF_CPD, "contrast_sigma_deg": CONTRAST_SIGMA_DEG,
                          "field_deg": FIELD_DEG, "scored_size_px": IMAGE_SIZE},
                "summary": self.summary(), "aims": self.aims(), "records": self.records}

    def write(self, out_dir) -> dict[str, Path]:
        """Write report.json, per_seed.csv, summary.csv and sheets/<roi>.png (rows = subjects, columns =
        seeds) under ``out_dir``; returns {name: path}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "per_seed": out / "per_seed.csv", "summary": out / "summary.csv"}
        atomic_write_json(paths["json"], to_jsonable(self.to_json()))
        cols = ["roi", "subject", "seed", "key", "preferred", "independent", "observer", "clip", "hf_fraction",
                "colourfulness",
                "ecc_centroid_deg"]
        _write_csv(paths["per_seed"], cols, self.records)
        summ = self.summary()
        scols = [c for c in summ[0] if not c.endswith("_counts")] if summ else ["roi"]
        _write_csv(paths["summary"], scols, summ)
        for roi in self.rois:
            rows = [(s, self.images[(roi, s)]) for s in self.subjects if (roi, s) in self.images]
            if rows:
                p = out / "sheets" / f"{_safe(roi)}.png"
                _contact_sheet(roi, rows, p)
                paths[f"sheet:{roi}"] = p
        return paths


def _safe(name: str) -> str:
    return name.replace("+", "plus").replace("/", "_")


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _contact_sheet(roi: str, rows: list[tuple[str, np.ndarray]], path: Path, cell: int = 96) -> None:
    """PNG grid: one row per subject label (label on the left), one column per seed."""
    from PIL import Image, ImageDraw

    margin, top = 70, 18
    n_cols = max(len(imgs) for _, imgs in rows)
    sheet = Image.new("RGB", (margin + n_cols * cell, top + len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"ROI-optimal scenes: {roi}", fill=(0, 0, 0))
    for i, (label, imgs) in enumerate(rows):
        draw.text((4, top + i * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for j, im in enumerate(imgs):
            tile = Image.fromarray(np.asarray(im, np.uint8)).resize((cell, cell), Image.BICUBIC)
            sheet.paste(tile, (margin + j * cell, top + i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
