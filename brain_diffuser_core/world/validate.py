"""In-silico validation of ROI-optimal scenes on the MiniNSD world (``world validate``).

Brain-Diffuser's ROI-optimal scenes (PAPER.md, "ROI-optimal scenes") feed a synthetic pattern (1 inside an
ROI, 0 elsewhere) through a subject's decoders and generate an image. On real NSD one can only look at the
pictures; in the MiniNSD world the observers' tuning is known, so the pictures can be scored:

* **category ROIs** (faces, bodies, places, words): the fraction of generated images whose content is the
  ROI's preferred category, by two judges:

  - ``observer`` (the ground-truth judge). The observer's category channels come from a scene's *graph*
    (object boxes), which a generated image does not have. The judge therefore estimates them from pixels
    with a :class:`CoverageModel` (ridge regression from per-cell colour / contrast descriptors to the five
    coverage maps, fitted on the world's training images and their graphs). The low-level channels are
    computed exactly (:func:`~brain_diffuser_core.world.observer.scene_features`). These channels go through
    the observer's noise-free response; each category ROI (area ``faces``, ``bodies``, ``places``,
    ``words``) gives its mean response over its voxels; each mean is z-scored with its mean and standard
    deviation over the same calibration images (so that an ROI with a large baseline or gain does not win
    by default); the image is judged to be of the category whose ROI has the largest z-score. For the
    subject average the z-scores of the subjects' observers are averaged first. Chance is 1/4.
    The judge can be biased on images unlike the world's (e.g. untrained models' noise is mostly judged
    "word": fine contrast): the summary therefore also gives, per category ROI, the fraction of the OTHER
    ROIs' scenes judged as that category (``<judge>_other_rois_fraction``); a preferred fraction means
    something only well above it.
  - ``clip``: nearest centroid (cosine) in the bundle CLIP's image-embedding space, centroids = mean
    normalised embedding of the calibration images of each of the world's six categories. Chance 1/6.
    Only when the bundle's CLIP towers can be loaded.

* **decoder level** (separates decoder faults from generator faults): before any image is generated, the
  ROI pattern's predicted CLIP features (:meth:`~brain_diffuser_core.pipeline.BrainDiffuser.pattern_features`,
  the subject average averaging them) are classified by :class:`DecodedCategoryCheck`: nearest category
  centroid (cosine) among the world's six categories, separately for ``clip_text`` (77 x D, flattened) and
  ``clip_vision`` (257 x D, flattened). Centroids are the bundle CLIP's features of the calibration scenes
  (``text_embeddings_batch`` of their captions, ``vision_embeddings`` of their images) with the mean over all
  calibration items subtracted, averaged per category. Summary columns ``decoded_text_category`` and
  ``decoded_vision_category`` ("n/a" when the bundle's CLIP does not load, as for the clip judge); for a
  category ROI the aims say whether the decoded text category is the preferred one. A category ROI whose
  decoded features already point elsewhere has a decoder (or feature) fault; one whose decoded features are
  right but whose images are judged wrong has a generator fault. (Measured on the cached demo bundle fitted
  on ``assets/demo/models``, 600 calibration scenes, each of its 4 subjects and the average alike: text
  features of faces / bodies / places / words / V1 / V4 nearest face / body / place / word / texture /
  object; vision features weaker: face, body, then body for places, words, V1 and V4.)
* **V1 vs V4**: high-spatial-frequency energy (:func:`hf_energy_fraction`) and colourfulness
  (:func:`colourfulness`, Hasler & Suesstrunk 2003). Aim: V1 scenes carry more high-frequency energy.
* **eccentricity bands**: radial centre of mass of contrast energy (:func:`contrast_centroid_deg`, degrees
  in the world's 8.4 deg field), and its noise-robust form (:func:`differential_contrast_centroids`: the
  seed-averaged radial contrast profile of a band minus the least-squares multiple of the bands' mean profile,
  so what all bands' scenes share, the generator's own texture and noise included, cancels, and the amount of
  contrast does not count, only where it is). Aim: each moves outward band by band.

Every generated image is resized to the world's 64 px before scoring (all ROIs alike). Nothing here claims
an aim is met: :meth:`ValidationReport.aims` computes each one from the numbers, and untrained demo models
are flagged in the report.

Modules: image measures in :mod:`.measures`, the judges and the decoder-level check in :mod:`.validate_judges`,
the report in :mod:`.validate_report`; this module plans, generates and scores (every public name of those
modules is importable from here too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..rois import PAPER_ROIS, roi_spec
from ..seeding import seed_for
from .measures import (CONTRAST_SIGMA_DEG, HF_CUTOFF_CPD, colourfulness, contrast_centroid_deg,
                       differential_contrast_centroids, hf_energy_fraction, rms_contrast, to_world_size)
from .validate_judges import (CATEGORY_ROIS, DECODED_FEATURES, JUDGES, ClipJudge, CoverageModel,
                              DecodedCategoryCheck, ObserverJudge, _load_clip, _load_clip_judge,
                              world_calibration_scenes)
from .validate_report import ECCENTRICITY_ROIS, NOT_AVAILABLE, ValidationReport

__all__ = [
    "CATEGORY_ROIS",
    "ECCENTRICITY_ROIS",
    "DEFAULT_ROIS",
    "HF_CUTOFF_CPD",
    "CONTRAST_SIGMA_DEG",
    "JUDGES",
    "to_world_size",
    "hf_energy_fraction",
    "colourfulness",
    "rms_contrast",
    "contrast_centroid_deg",
    "differential_contrast_centroids",
    "CoverageModel",
    "ObserverJudge",
    "ClipJudge",
    "DecodedCategoryCheck",
    "DECODED_FEATURES",
    "NOT_AVAILABLE",
    "ValidationReport",
    "validate_bundle",
    "ValidationPlan",
    "plan_validation",
    "generate_validation_images",
    "ValidationJudges",
    "fit_judges",
    "score_validation",
    "world_calibration_scenes",
]

#: the paper's 8 ROIs and the 5 eccentricity bands
DEFAULT_ROIS: tuple[str, ...] = tuple(PAPER_ROIS) + ECCENTRICITY_ROIS
#: subject label of the subject average
AVERAGE = "average"

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------- driver
def _subject_label(s) -> str:
    return AVERAGE if s == AVERAGE else f"subj{int(s):02d}"


def _models_trained(bundle) -> bool | None:
    from .demo import TRAINED_KEY, UNTRAINED_KEY

    models = bundle.models
    if UNTRAINED_KEY in models:
        return False
    if TRAINED_KEY in models:
        return True
    return None


@dataclass
class ValidationPlan:
    """What a validation generates: per (roi, subject label), the subjects' ROI patterns, the members (the
    subjects whose predicted features are averaged), the generation name and the seeds.

    patterns : (roi, label) -> {subject: float32 (n_voxels,)}; seeds : (roi, label) -> [seed per k]."""

    world_root: str
    rois: list[str]
    subjects: list  # ints and/or "average", as given
    labels: list[str]
    n_seeds: int
    base_seed: int
    avg_members: list[int]
    needed: list[int]
    patterns: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    info: object = None

    def name(self, roi: str, label: str) -> str:
        return f"validate/{roi}/{label}"

    def keys(self) -> list[tuple[str, str]]:
        """(roi, label) in report order."""
        return [(roi, label) for roi in self.rois for label in self.labels]


def plan_validation(bundle, world_root, *, rois: Sequence[str] = DEFAULT_ROIS,
                    subjects: Sequence[int | str] | None = None, n_seeds: int = 16, judge: str = "independent",
                    base_seed: int = 0, cache_dir=None) -> ValidationPlan:
    """Check the inputs against ``bundle`` (a :class:`~brain_diffuser_core.bundle.Bundle`) and the world, and
    compute every (roi, subject)'s patterns and seeds (see :func:`validate_bundle`)."""
    from ..nsd import load_subject
    from .build import read_world_info

    if judge not in JUDGES:
        raise ValueError(f"'judge' must be one of {list(JUDGES)}; {judge!r} was provided")
    rois = list(rois)
    for r in rois:
        roi_spec(r)  # raises UnknownRoiError naming the catalogue
    if not rois:
        raise ValueError("'rois' must name at least one ROI; an empty list was provided")
    if int(n_seeds) < 1:
        raise ValueError(f"'n_seeds' must be >= 1; {n_seeds} was provided")
    info = read_world_info(world_root)
    bundle_subjects = bundle.subjects
    if subjects is None:
        subjects = list(bundle_subjects) + ([AVERAGE] if len(bundle_subjects) > 1 else [])
    subjects = [s if s == AVERAGE else int(s) for s in subjects]
    ints = [s for s in subjects if s != AVERAGE]
    bad = [s for s in ints if s not in bundle_subjects or s not in info.n_voxels]
    if bad or not subjects:
        raise ValueError(f"'subjects' must be a non-empty list among the bundle's and world's subjects "
                         f"{sorted(set(bundle_subjects) & set(info.n_voxels))} or 'average'; {subjects} was provided")
    avg_members = [s for s in bundle_subjects if s in info.n_voxels]
    needed = sorted(set(ints) | (set(avg_members) if AVERAGE in subjects else set()))
    subs = {s: load_subject(world_root, s, cache_dir=cache_dir, progress=False) for s in needed}
    for s, sub in subs.items():
        bundle.check_subject(s, sub.n_voxels, sub.mask_sha256)
    plan = ValidationPlan(world_root=str(world_root), rois=rois, subjects=subjects,
                          labels=[_subject_label(s) for s in subjects], n_seeds=int(n_seeds),
                          base_seed=int(base_seed), avg_members=avg_members, needed=needed, info=info)
    for roi in rois:
        per = {s: subs[s].synthetic_pattern({roi: 1.0}) for s in needed}
        for subj, label in zip(subjects, plan.labels):
            members = avg_members if subj == AVERAGE else [subj]
            plan.patterns[(roi, label)] = {s: per[s] for s in members}
            plan.seeds[(roi, label)] = [seed_for("pattern", plan.name(roi, label), k, base_seed=base_seed)
                                        for k in range(int(n_seeds))]
    return plan


def generate_validation_images(diffuser, plan: ValidationPlan, roi: str, label: str, seeds: Sequence[int], *,
                               run_stage2: bool = True, **overrides) -> list[np.ndarray]:
    """The scored images (final, or the upscaled stage 1 without stage 2) of (roi, label) for ``seeds``,
    generated as one batch."""
    recs = diffuser.reconstruct_pattern(plan.patterns[(roi, label)], name=plan.name(roi, label), seeds=list(seeds),
                                        run_stage2=run_stage2, **overrides)
    return [r.final if r.final is not None else r.stage1_upscaled for r in recs]


@dataclass
class ValidationJudges:
    """The judges fitted on the world (observer, independent, CLIP when it loads) and the decoder-level check."""

    observer: ObserverJudge
    independent: object
    clip: "ClipJudge | None"
    clip_note: str
    decoded: "DecodedCategoryCheck | None"
    decoded_note: str
    n_calibration: int


def fit_judges(diffuser, plan: ValidationPlan, *, judge: str = "independent", n_calibration: int = 600,
               judge_scenes: int = 200, cache_dir=None) -> ValidationJudges:
    """Fit the judges of :func:`validate_bundle` (``diffuser``: its bundle and device are used, not its
    generative models). Raises ValueError for judge "clip" when the bundle's CLIP does not load."""
    from ..config import cache_root
    from .judge import CategoryJudge
    from .observer import Observer

    info = plan.info
    observers = {s: Observer(s, seed=int(info.params["seed"]), noise_sd=float(info.params["noise_sd"]))
                 for s in plan.needed}
    scenes = world_calibration_scenes(plan.world_root, n_calibration)
    obs_judge = ObserverJudge.fit(observers, scenes)
    independent = CategoryJudge.cached(cache_dir if cache_dir is not None else cache_root(),
                                       n_per_category=judge_scenes,
                                       n_heldout_per_category=max(1, int(judge_scenes) // 4))
    extractor, why, where = _load_clip(diffuser)
    if extractor is not None:
        clip_judge, clip_note = _load_clip_judge(diffuser, scenes, extractor, where)
        decoded_check = DecodedCategoryCheck.fit(extractor, scenes)
        decoded_note = (f"nearest centred centroid (cosine) over {len(decoded_check.categories)} categories of "
                        f"{where}'s text / vision features of {len(scenes)} calibration scenes")
    else:
        clip_judge, clip_note, decoded_check, decoded_note = None, why, None, why
    if judge == "clip" and clip_judge is None:
        raise ValueError(f"judge 'clip' needs the bundle's CLIP towers; {clip_note}")
    return ValidationJudges(obs_judge, independent, clip_judge, clip_note, decoded_check, decoded_note, len(scenes))


def score_validation(diffuser, plan: ValidationPlan, judges: ValidationJudges, images: Mapping, *,
                     judge: str = "independent", run_stage2: bool = True, **overrides) -> ValidationReport:
    """The report of the generated ``images`` ((roi, label) -> uint8 (n_seeds, H, W, 3), seeds in plan
    order): every judge's labels, the image measures and the decoder-level check per (roi, label)."""
    report = ValidationReport(rois=plan.rois, subjects=list(plan.labels), n_seeds=plan.n_seeds,
                              judge=judge, clip_note=judges.clip_note, decoded_note=judges.decoded_note,
                              independent_note=judges.independent.describe(),
                              models_trained=_models_trained(diffuser.bundle),
                              settings={"base_seed": plan.base_seed, "run_stage2": bool(run_stage2),
                                        "n_calibration": judges.n_calibration, **overrides})
    for roi, label in plan.keys():
        pats = plan.patterns[(roi, label)]
        members = list(pats)
        report.n_voxels[(roi, label)] = int(sum(int(p.sum()) for p in pats.values()))
        if judges.decoded is not None:  # decoder level: the features the generator will be given
            feats = diffuser.pattern_features(pats)
            report.decoded[(roi, label)] = {k: judges.decoded.classify(k, feats[k])[0] for k in DECODED_FEATURES}
        imgs = np.stack(images[(roi, label)])
        report.images[(roi, label)] = imgs
        small = to_world_size(imgs)
        obs_labels = judges.observer.classify(small, members)
        ind_labels = judges.independent.classify(small)
        clip_labels = judges.clip.classify(imgs) if judges.clip is not None else [None] * len(imgs)
        hf, col, ecc = hf_energy_fraction(small), colourfulness(small), contrast_centroid_deg(small)
        name = plan.name(roi, label)
        for k, seed in enumerate(plan.seeds[(roi, label)]):
            report.records.append({
                "roi": roi, "subject": label, "seed": int(seed), "key": f"{name}/seed{seed}",
                "preferred": CATEGORY_ROIS.get(roi), "independent": ind_labels[k], "observer": obs_labels[k],
                "clip": clip_labels[k],
                "hf_fraction": float(hf[k]), "colourfulness": float(col[k]),
                "ecc_centroid_deg": None if not np.isfinite(ecc[k]) else float(ecc[k])})
    return report


def validate_bundle(
    diffuser,
    world_root,
    *,
    rois: Sequence[str] = DEFAULT_ROIS,
    subjects: Sequence[int | str] | None = None,
    n_seeds: int = 16,
    judge: str = "independent",
    progress: ProgressFn | None = None,
    n_calibration: int = 600,
    batch_size: int = 16,
    base_seed: int = 0,
    cache_dir=None,
    judge_scenes: int = 200,
    **overrides,
) -> ValidationReport:
    """Generate ROI-optimal scenes with ``diffuser`` and score them against the world's known tuning.

    Parameters
    ----------
    diffuser : :class:`~brain_diffuser_core.pipeline.BrainDiffuser` with decoders fitted on this world.
    world_root : path of the MiniNSD world (``build_world`` output).
    rois : catalogue ROI names (default: the paper's 8 and the 5 eccentricity bands).
    subjects : ints among the bundle's subjects and/or ``"average"`` (the paper's subject average: the mean of
        the predicted features of every bundle subject in the world); default: every bundle subject and
        ``"average"`` (when there are two or more).
    n_seeds : images per (roi, subject); seed ``k`` is ``seed_for("pattern", "validate/<roi>/<subject>", k,
        base_seed=base_seed)``.
    judge : "independent" (default), "observer" or "clip": which judge's fraction the category aims use. All
        are computed (the clip judge when the bundle's CLIP loads; "clip" fails when it does not).
    progress : callable(step, done, total) after each generated batch.
    n_calibration : world train images used to fit and calibrate the observer and CLIP judges.
    judge_scenes : fresh scenes per category that fit the independent judge (a quarter as many score it).
    batch_size : images generated at once.
    cache_dir : prepared-subject cache for :func:`~brain_diffuser_core.nsd.load_subject`; the independent
        judge's fitted probe is cached under it too (default: the app's cache).
    overrides : stage settings for generation (e.g. ``num_inference_steps=10``, ``run_stage2=False``).

    The ``world validate`` command runs the same steps with the generation on the batch layer
    (:mod:`brain_diffuser_core.batch.validate`): :func:`plan_validation`, :func:`fit_judges`,
    :func:`generate_validation_images` per batch of seeds, :func:`score_validation`.

    Returns
    -------
    ValidationReport
    """
    run_stage2 = bool(overrides.pop("run_stage2", True))
    plan = plan_validation(diffuser.bundle, world_root, rois=rois, subjects=subjects, n_seeds=n_seeds,
                           judge=judge, base_seed=base_seed, cache_dir=cache_dir)
    judges = fit_judges(diffuser, plan, judge=judge, n_calibration=n_calibration, judge_scenes=judge_scenes,
                        cache_dir=cache_dir)
    n_batches = math.ceil(int(n_seeds) / int(batch_size))
    total, done = len(plan.keys()) * n_batches, 0
    if progress is not None:
        progress("judges calibrated", 0, total)
    images = {}
    for roi, label in plan.keys():
        seeds = plan.seeds[(roi, label)]
        images[(roi, label)] = []
        for b in range(n_batches):
            chunk = seeds[b * batch_size:(b + 1) * batch_size]
            images[(roi, label)] += generate_validation_images(diffuser, plan, roi, label, chunk,
                                                               run_stage2=run_stage2, **overrides)
            done += 1
            if progress is not None:
                progress(f"{roi} {label}", done, total)
    return score_validation(diffuser, plan, judges, images, judge=judge, run_stage2=run_stage2, **overrides)
