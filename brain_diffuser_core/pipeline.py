"""BrainDiffuser: an fMRI trial or a synthetic ROI pattern -> stage-1 image -> final reconstruction.

The flow (Ozcelik & VanRullen 2023)::

    fMRI (n, n_voxels) --ridge--> VDVAE latents (n, 91168) --VDVAE decode--> stage 1 (64 px) --bicubic--> 512 px
                      --ridge--> CLIP-text (n, 77, 768) + CLIP-vision (n, 257, 768)
    stage 1 (512 px) + CLIP embeddings --Versatile Diffusion img2img (37 DDIM steps, CFG 7.5)--> final (512 px)

Differences from the original scripts, on purpose:

* one device (CPU or one GPU), float16 on CUDA, models loaded once (the original hard-codes two GPUs);
* predictions of a trial are rescaled with leave-one-out statistics of TRAIN predictions
  (``rescale="train"``); the original z-scores across the whole test set (``rescale="paper"``, kept for
  reproducing the table), which leaks test statistics and cannot serve a single trial;
* every item has its own seed, by default derived from its 73k image id (or pattern name), so a
  reconstruction reproduces alone whatever batch or loop it ran in.

``BrainDiffuser(..., paper=True)`` (:data:`~brain_diffuser_core.config.PAPER_MODE`) undoes the departures that
change numbers: test-set z-scoring, start noise at t=741, unconditional grey 127, truncated final images.

Synthetic ROI patterns follow the paper: the raw pattern (1 inside the ROI, 0 elsewhere, not z-scored) goes
through the decoders without rescaling, and each predicted feature vector is re-normalised to the mean
Euclidean norm of the training features; the subject average is the mean of the subjects' predicted features.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .bundle import Bundle, BundleError, load_bundle
from .config import FEATURE_NAMES, PAPER, ROI_PATTERN_QUANTILE, StageOneConfig, StageTwoConfig, mode
from .seeding import seed_for

_log = logging.getLogger(__name__)

__all__ = ["Reconstruction", "GenerativeModels", "BrainDiffuser", "GenerationError", "GenerationQueue",
           "resolve_device"]

#: progress callback of a reconstruction: callback(stage, step, total, preview) with stage "stage1"/"stage2",
#: preview a uint8 (n, H, W, 3) image batch or None.
ProgressCallback = Callable[[str, int, int, "np.ndarray | None"], None]


#: queue callback: on_wait(position) with position = how many generations are ahead of the caller (0: its turn)
WaitCallback = Callable[[int], None]


class GenerationQueue:
    """A first-come first-served lock for the generative models, which tells waiting callers their place.

    Use as a lock (``with queue: ...``) or through :meth:`acquire` / :meth:`release`. Each caller draws a
    ticket; tickets are served in order, one at a time. While waiting, ``on_wait(position)`` is called each
    time the position changes (position = how many generations are ahead: the running one plus the waiting
    ones drawn earlier), starting with the caller's first position, and finally with 0 when its turn comes.
    The callback runs in the caller's thread without any internal lock held; if it (or the wait) raises, the
    ticket is withdrawn and the queue goes on serving the others.

    :meth:`report_to` sets a default ``on_wait`` for the current thread, for code that takes the lock without
    passing a callback (e.g. :func:`brain_diffuser_core.evaluation.evaluate_bundle`).

    heartbeat_s : when set, ``on_wait`` is also called again with the unchanged position every ``heartbeat_s``
        seconds of waiting. A web page uses it to notice a user who left while queued (its callback raises
        then, and the ticket is withdrawn instead of running a generation nobody will see).
    """

    def __init__(self, heartbeat_s: float | None = None):
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise ValueError(f"'heartbeat_s' must be a positive number of seconds or None; {heartbeat_s!r} was provided")
        self.heartbeat_s = heartbeat_s
        self._cond = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket now allowed to run
        self._withdrawn: set[int] = set()
        self._local = threading.local()

    # ------------------------------------------------------------------ lock protocol
    def acquire(self, on_wait: WaitCallback | None = None) -> None:
        """Wait for this caller's turn (FIFO); ``on_wait`` as in the class docstring (default: :meth:`report_to`'s).

        Logs (logger ``brain_diffuser_core.pipeline``, INFO) each ticket drawn, run, withdrawn and done with the
        queue length then, so a server log shows what happened to a user who left while queued."""
        on_wait = on_wait if on_wait is not None else getattr(self._local, "on_wait", None)
        with self._cond:
            ticket = self._next
            self._next += 1
            length = self._ahead(self._next)
        _log.info("generation queue: ticket %d drawn, queue length %d", ticket, length)
        reported, beat = None, False
        try:
            while True:
                with self._cond:
                    position = self._ahead(ticket)
                    if position > 0 and position == reported and not beat:
                        # woken by a release/withdrawal (position re-read), or the heartbeat ran out
                        beat = not self._cond.wait(self.heartbeat_s) and on_wait is not None
                        continue
                if on_wait is not None and (position != reported or beat):
                    on_wait(position)
                reported, beat = position, False
                if position == 0:
                    _log.info("generation queue: ticket %d runs", ticket)
                    return
        except BaseException as err:
            self._withdraw(ticket)
            _log.info("generation queue: ticket %d withdrawn while waiting (%s), queue length %d", ticket,
                      type(err).__name__, self.queue_length())
            raise

    def release(self) -> None:
        """End the running generation and let the next ticket run."""
        with self._cond:
            if self._serving >= self._next:
                raise RuntimeError("GenerationQueue.release() was called while no generation holds the queue")
            done = self._serving
            self._advance()
            length = self._ahead(self._next)
        _log.info("generation queue: ticket %d done, queue length %d", done, length)

    def _advance(self) -> None:
        self._serving += 1
        while self._serving in self._withdrawn:
            self._withdrawn.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def _ahead(self, ticket: int) -> int:
        """Tickets still to run before ``ticket`` (the running one included); call with ``_cond`` held."""
        return ticket - self._serving - sum(1 for t in self._withdrawn if self._serving < t < ticket)

    def _withdraw(self, ticket: int) -> None:
        with self._cond:
            if ticket == self._serving:  # its turn came meanwhile: pass it on
                self._advance()
            elif ticket > self._serving:
                self._withdrawn.add(ticket)
                self._cond.notify_all()  # the positions of those behind it changed

    def __enter__(self) -> "GenerationQueue":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ inspection
    def queue_length(self) -> int:
        """Generations running or waiting now (0: idle)."""
        with self._cond:
            return self._ahead(self._next)  # every ticket handed out and not yet done

    def locked(self) -> bool:
        """Whether a generation is running (or waiting) now."""
        return self.queue_length() > 0

    @contextlib.contextmanager
    def report_to(self, on_wait: WaitCallback | None):
        """Within the block, acquisitions by this thread without their own callback report to ``on_wait``."""
        previous = getattr(self._local, "on_wait", None)
        self._local.on_wait = on_wait
        try:
            yield self
        finally:
            self._local.on_wait = previous


class GenerationError(RuntimeError):
    """A reconstruction could not run (e.g. CUDA out of memory); the models stay usable."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if present, else CPU; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"'device' {str(device)!r} was asked for but no CUDA GPU is available; use 'cpu' or 'auto'")
    return device


@dataclass
class Reconstruction:
    """One reconstruction and everything that went into it.

    stage1 : uint8 (s, s, 3) VDVAE output at its own resolution (64 px for the paper's model).
    stage1_upscaled : uint8 (S, S, 3) bicubic upscale fed to stage 2 (S = 512 for Versatile Diffusion).
    final : uint8 (S, S, 3) after Versatile Diffusion img2img, or None when stage 2 was not run.
    features : the predicted features: "vdvae" (91168,), "clip_text" (77, 768), "clip_vision" (257, 768).
    timings : seconds: "features", "stage1", "stage2" (per batch, shared by its items), "total".
    """

    key: str
    seed: int
    stage1: np.ndarray
    stage1_upscaled: np.ndarray
    final: np.ndarray | None
    features: dict[str, np.ndarray]
    timings: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)


class GenerativeModels:
    """VDVAE, CLIP (for the unconditional embeddings) and Versatile Diffusion, loaded once on one device.

    Build with :meth:`from_references` (paths or Hugging Face ids, as stored in a bundle's manifest).
    ``image_size`` (S) is the stage-2 resolution: UNet sample size x VAE factor (512 for Versatile Diffusion;
    the paper's 512 when the UNet config has no ``sample_size``, as diffusers' conversion script can leave it).
    ``uncond_vision`` : (257, D) of the grey ``PAPER.stage2.unconditional_grey``, or {grey value: (257, D)}
    (:meth:`from_references` gives 128 and the paper's 127).
    """

    def __init__(self, vdvae, img2img, uncond_text: np.ndarray, uncond_vision):
        self.vdvae = vdvae
        self.img2img = img2img
        self.uncond_text = uncond_text
        by_grey = dict(uncond_vision) if isinstance(uncond_vision, Mapping) else {
            PAPER.stage2.unconditional_grey: uncond_vision}
        self._uncond_vision = {int(k): v for k, v in by_grey.items()}
        self.uncond_vision = self._uncond_vision.get(PAPER.stage2.unconditional_grey,
                                                     next(iter(self._uncond_vision.values())))
        unet = img2img.image_unet
        sample_size = getattr(unet.config, "sample_size", None)
        self.image_size = (int(sample_size) * int(img2img.vae_scale_factor) if sample_size
                           else PAPER.stage2.image_size)
        self.device = img2img.device
        self.dtype = img2img.dtype
        # the dual transformers' mix ratio lives on the shared UNet: one generation at a time per process,
        # first come first served; waiting callers learn their place (GenerationQueue)
        self.lock = GenerationQueue()

    def uncond_vision_for(self, grey: int) -> np.ndarray:
        """The unconditional CLIP-vision embedding (257, D) of a uniform grey image of value ``grey``."""
        if int(grey) not in self._uncond_vision:
            raise ValueError(f"no unconditional vision embedding for grey {grey!r}; these models hold "
                             f"{sorted(self._uncond_vision)} (GenerativeModels.from_references makes 128 and 127)")
        return self._uncond_vision[int(grey)]

    @classmethod
    def from_references(cls, models: Mapping[str, Mapping[str, str]], device: str | torch.device = "auto",
                        dtype: torch.dtype | None = None) -> "GenerativeModels":
        """Load from references ``{"vdvae": {"path": ...}, "clip": {...}, "versatile_diffusion": {...}}``.

        ``clip`` may be omitted when the Versatile Diffusion folder holds the CLIP encoders (its layout does).
        """
        from .diffusion import DualGuidedImg2Img, load_versatile_diffusion
        from .features.clip import ClipFeatureExtractor
        from .features.vdvae import load_vdvae

        for name in ("vdvae", "versatile_diffusion"):
            if name not in models:
                raise BundleError(f"the bundle names no {name!r} model; it names {sorted(models)}")
        device = resolve_device(device)

        def where(name: str) -> str:
            ref = models[name]
            return ref.get("path") or ref["hf_id"]

        vdvae = load_vdvae(where("vdvae"), device=device, dtype=torch.float32)
        components = load_versatile_diffusion(where("versatile_diffusion"), device=device, dtype=dtype)
        clip = ClipFeatureExtractor.from_pretrained(where("clip" if "clip" in models else "versatile_diffusion"),
                                                    device=device)
        greys = {PAPER.stage2.unconditional_grey, mode(paper=True).unconditional_grey}
        return cls(vdvae, DualGuidedImg2Img(components), clip.unconditional_text(),
                   {g: clip.unconditional_vision(grey=g) for g in sorted(greys)})

    def generate(self, features: Mapping[str, np.ndarray], *, seeds: Sequence[int],
                 stage1: StageOneConfig = PAPER.stage1, stage2: StageTwoConfig = PAPER.stage2,
                 run_stage2: bool = True, callback: ProgressCallback | None = None, preview_every: int = 0,
                 on_wait: WaitCallback | None = None):
        """Both stages for n items of predicted features ({"vdvae": (n, D), "clip_text": (n, 77, d), ...}).

        Returns ``(stage1 uint8 (n, s, s, 3), upscaled uint8 (n, S, S, 3), final uint8 (n, S, S, 3) or None,
        stage-1 seconds, stage-2 seconds)``. Serialised by :attr:`lock` (first come first served);
        ``on_wait(position)`` hears how many generations are ahead while this one waits (see
        :class:`GenerationQueue`). CUDA out-of-memory becomes a :class:`GenerationError` and leaves the
        models usable.
        """
        n = len(features["vdvae"])
        self.lock.acquire(on_wait)
        try:
            # 1. Stage 1: VDVAE with the predicted first layers, the others from the prior
            t1 = time.perf_counter()
            low = self.vdvae.decode(torch.as_tensor(np.asarray(features["vdvae"]).reshape(n, -1)),
                                    temperature=stage1.temperature, seed=list(seeds), output=stage1.output)
            upscaled = upscale_bicubic(low, self.image_size)
            t_stage1 = time.perf_counter() - t1
            if callback is not None:
                callback("stage1", 1, 1, upscaled)
            # 2. Stage 2: Versatile Diffusion img2img from the stage-1 image
            t2 = time.perf_counter()
            final = None
            if run_stage2:
                step_cb = None
                if callback is not None:
                    def step_cb(step, total, _latents, preview):
                        callback("stage2", step, total, preview)
                final = self.img2img(
                    upscaled, features["clip_text"], features["clip_vision"], seeds=list(seeds),
                    strength=stage2.strength, num_inference_steps=stage2.num_inference_steps,
                    guidance_scale=stage2.guidance_scale, vision_mix=stage2.vision_mix, eta=stage2.ddim_eta,
                    uncond_text=self.uncond_text, uncond_vision=self.uncond_vision_for(stage2.unconditional_grey),
                    callback=step_cb, preview_every=preview_every, start_noise_offset=stage2.start_noise_offset,
                    truncate_output=stage2.truncate_output)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t_stage2 = time.perf_counter() - t2
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            raise GenerationError(
                f"CUDA out of memory while reconstructing {n} item(s) on {self.device}: {str(err).splitlines()[0]}. "
                "Reconstruct fewer items at once (batch 1 needs about 10 GB in float16), close other GPU jobs, "
                "or use device 'cpu'. The models are still loaded and usable."
            ) from None
        finally:
            self.lock.release()
        return low, upscaled, final, t_stage1, t_stage2


class BrainDiffuser:
    """Decoders of a bundle + generative models: fMRI or ROI pattern -> :class:`Reconstruction`.

    Parameters
    ----------
    bundle : a loaded :class:`~brain_diffuser_core.bundle.Bundle` (or a path to one).
    models : :class:`GenerativeModels`; default: loaded from the bundle's model references.
    device : "auto", "cpu", "cuda", ...; used when ``models`` is loaded here and for decoder predictions.
    stage1, stage2 : defaults for every call (the paper's, :data:`~brain_diffuser_core.config.PAPER`).
    paper : reproduce the original scripts (:data:`~brain_diffuser_core.config.PAPER_MODE`): ``stage2`` gets
        the mode's stage-2 fields and the default ``rescale`` is "paper" (z-score across the whole test set:
        pass every test trial in one call).
    """

    def __init__(self, bundle: Bundle | str | Path, models: GenerativeModels | None = None, *,
                 device: str | torch.device = "auto", stage1: StageOneConfig = PAPER.stage1,
                 stage2: StageTwoConfig = PAPER.stage2, paper: bool = False):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        missing = [f for f in FEATURE_NAMES if f not in self.bundle.features]
        if missing:
            raise BundleError(f"bundle {self.bundle.path} has no decoders for {missing}; it has {self.bundle.features}")
        self.models = models if models is not None else GenerativeModels.from_references(self.bundle.models, device)
        self.device = self.models.device
        self.mode = mode(paper)
        self.stage1 = replace(stage1, **self.mode.stage1_overrides()) if paper else stage1
        self.stage2 = replace(stage2, **self.mode.stage2_overrides()) if paper else stage2

    # ------------------------------------------------------------------------------------ features
    def _check_fmri(self, fmri, subject: int, what: str) -> np.ndarray:
        n_vox = int(self.bundle.subject_info(subject)["n_voxels"])
        x = np.asarray(fmri, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != n_vox:
            raise ValueError(f"'{what}' for subject {subject} must have {n_vox} values per row (one per nsdgeneral "
                             f"voxel); shape {np.shape(fmri)} was provided")
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
            raise ValueError(f"'{what}' contains {int(bad.sum())} NaN/inf values (rows {rows}); "
                             "replace them (e.g. with 0) before decoding")
        return x

    def predict_features(self, fmri, subject: int, *, rescale: str | None = None) -> dict[str, np.ndarray]:
        """Decode z-scored trial fMRI (n, n_voxels) -> {feature: float32 (n, *feature_shape)}.

        ``rescale``: "train" (leave-one-out train statistics), "paper" (z-score across this batch, as the
        original; needs the whole test set in one batch), or "none"; default: this diffuser's mode's ("train",
        or "paper" with ``paper=True``).
        """
        rescale = self.mode.rescale if rescale is None else rescale
        x = self._check_fmri(fmri, subject, "fmri")
        out = {}
        for name in FEATURE_NAMES:
            pred = self.bundle.decoder(subject, name).predict(x, rescale=rescale)
            out[name] = pred.reshape((len(x),) + self.bundle.feature_shape(name))
        return out

    def pattern_features(self, patterns: Mapping[int, np.ndarray], *, scale: str | None = None
                         ) -> dict[str, np.ndarray]:
        """The paper's ROI-optimal features from synthetic patterns, one per subject (averaged over subjects).

        patterns : subject -> float32 (n_voxels,) or (n, n_voxels) raw pattern (1 inside the ROI, 0 elsewhere;
            not z-scored). With several subjects the predicted features are averaged (the paper's subject
            average); every subject must give the same number of patterns.
        scale : how the pattern-driven part ``d = W p`` (the prediction minus the prediction for an all-zero
            pattern, i.e. the intercept) is scaled before the intercept is added back, as the authors'
            ``roi_generate_features.py`` does (only ``d`` is normalised, never the intercept); default: this
            diffuser's mode's (``"quantile"``, or ``"paper"`` with ``paper=True``):

            * ``"quantile"``: ``||d||`` = ``z * sd_u`` with ``sd_u`` the training features' standard deviation
              along ``u = d / ||d||`` (the decoder's principal axes of its training targets,
              :meth:`~brain_diffuser_core.ridge_decoder.RidgeDecoder.target_sd_along`) and ``z`` the normal
              quantile of :data:`~brain_diffuser_core.config.ROI_PATTERN_QUANTILE` (0.99: 2.33), i.e. the
              features go along the ROI's direction as far as the top 1% of training images do, and no
              further (per feature space, per subject). A decoder fitted before bundle format 3 has no
              principal axes: it falls back to ``"train"`` with a logged warning;
            * ``"train"``: ``||d||`` set to the RMS norm of the training features' deviation from their mean,
              ``sqrt(sum_j y_std_j^2)`` of the decoder, i.e. as far as a typical training image deviates in
              all directions together: 2.2-5 standard deviations along the ROI's direction on the demo, beyond
              its top 1% of training images (the scenes were caricatures: every face ROI scene one huge pale
              face);
            * ``"paper"``: the original's hand-set norms (:data:`PAPER_PATTERN_NORMS`: 50 for VDVAE, then
              z-scored across the patterns, mapped to the train mean/std and set to norm 80; 9 for CLIP-text,
              15 for CLIP-vision), which suit ViT-L/14 and the ImageNet VDVAE only.

        Returns {feature: float32 (n, *feature_shape)}.
        """
        scale = self.mode.pattern_scale if scale is None else scale
        if scale not in PATTERN_SCALES:
            raise ValueError(f"'scale' must be one of {list(PATTERN_SCALES)}; {scale!r} was provided")
        if not patterns:
            raise ValueError("'patterns' must map at least one subject to a pattern; {} was provided")
        per_subject = []
        for subject, pattern in patterns.items():
            x = self._check_fmri(pattern, subject, "pattern")
            feats = {}
            for name in FEATURE_NAMES:
                decoder = self.bundle.decoder(subject, name)
                pred = pattern_driven_features(decoder, x, scale=scale, feature=name)
                feats[name] = pred.reshape((len(x),) + self.bundle.feature_shape(name))
            per_subject.append(feats)
        counts = {len(f[FEATURE_NAMES[0]]) for f in per_subject}
        if len(counts) != 1:
            raise ValueError(f"every subject must give the same number of patterns; found counts {sorted(counts)}")
        return {name: np.mean([f[name] for f in per_subject], axis=0).astype(np.float32) for name in FEATURE_NAMES}

    # ------------------------------------------------------------------------------------ generation
    def reconstruct(self, fmri, subject: int, *, image_ids: Sequence[int] | None = None,
                    seeds: Sequence[int] | None = None, base_seed: int = 0, rescale: str | None = None,
                    run_stage2: bool = True, callback: ProgressCallback | None = None, preview_every: int = 0,
                    on_wait: WaitCallback | None = None, **overrides) -> list[Reconstruction]:
        """Reconstruct trials: z-scored fMRI (n, n_voxels) of ``subject`` -> n :class:`Reconstruction`.

        image_ids : the 73k ids shown (for default seeds and keys); default: row numbers.
        seeds : one per trial; default ``seed_for("trial", image_id, base_seed=base_seed)``, so a trial's
            result does not depend on what else is in the batch.
        overrides : any field of :class:`~brain_diffuser_core.config.StageOneConfig` /
            :class:`~brain_diffuser_core.config.StageTwoConfig` (``strength``, ``guidance_scale``,
            ``vision_mix``, ``num_inference_steps``, ``temperature``, ...).
        on_wait : called with the number of generations ahead while this one waits its turn
            (:class:`GenerationQueue`).
        """
        t0 = time.perf_counter()
        rescale = self.mode.rescale if rescale is None else rescale
        features = self.predict_features(fmri, subject, rescale=rescale)
        n = len(features["vdvae"])
        ids = list(range(n)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != n:
            raise ValueError(f"'image_ids' must hold one id per fMRI row ({n}); {len(ids)} were provided")
        keys = [f"subj{subject:02d}/nsd{i}" for i in ids]
        if seeds is None:
            seeds = [seed_for("trial", i, base_seed=base_seed) for i in ids]
        return self.generate(features, keys=keys, seeds=seeds, run_stage2=run_stage2, callback=callback,
                             preview_every=preview_every, feature_seconds=time.perf_counter() - t0,
                             extra_settings={"subject": subject, "rescale": rescale}, on_wait=on_wait, **overrides)

    def reconstruct_pattern(self, patterns: Mapping[int, np.ndarray], *, name: str = "pattern",
                            seeds: Sequence[int] | None = None, n_seeds: int = 1, base_seed: int = 0,
                            run_stage2: bool = True, callback: ProgressCallback | None = None,
                            preview_every: int = 0, on_wait: WaitCallback | None = None,
                            **overrides) -> list[Reconstruction]:
        """ROI-optimal scenes: one pattern per subject (averaged over subjects) -> one image per seed.

        seeds : default ``seed_for("pattern", name, k, base_seed=base_seed)`` for k < ``n_seeds``.
        """
        t0 = time.perf_counter()
        single = {}
        for subject, pattern in patterns.items():
            p = np.asarray(pattern, dtype=np.float32)
            if p.ndim != 1:
                raise ValueError(f"pattern for subject {subject} must be one vector (n_voxels,); shape {p.shape}")
            single[subject] = p
        feats = self.pattern_features(single, scale=self.mode.pattern_scale)
        if seeds is None:
            seeds = [seed_for("pattern", name, k, base_seed=base_seed) for k in range(n_seeds)]
        seeds = [int(s) for s in seeds]
        features = {k: np.repeat(v, len(seeds), axis=0) for k, v in feats.items()}
        keys = [f"{name}/seed{s}" for s in seeds]
        subjects = sorted(int(s) for s in patterns)
        return self.generate(features, keys=keys, seeds=seeds, run_stage2=run_stage2, callback=callback,
                             preview_every=preview_every, feature_seconds=time.perf_counter() - t0,
                             extra_settings={"subjects": subjects, "pattern": name}, on_wait=on_wait, **overrides)

    def stage_configs(self, overrides: Mapping[str, Any]) -> tuple[StageOneConfig, StageTwoConfig]:
        """This diffuser's stage settings with ``overrides`` applied (any field of either config); unknown names
        raise ValueError listing the allowed ones."""
        s1_fields = set(StageOneConfig.__dataclass_fields__)
        s2_fields = set(StageTwoConfig.__dataclass_fields__)
        unknown = set(overrides) - s1_fields - s2_fields
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; allowed: {sorted(s1_fields | s2_fields)}")
        s1 = replace(self.stage1, **{k: v for k, v in overrides.items() if k in s1_fields})
        s2 = replace(self.stage2, **{k: v for k, v in overrides.items() if k in s2_fields})
        return s1, s2

    def generate(self, features: Mapping[str, np.ndarray], *, keys: Sequence[str], seeds: Sequence[int],
                 run_stage2: bool = True, callback: ProgressCallback | None = None, preview_every: int = 0,
                 feature_seconds: float = 0.0, extra_settings: Mapping[str, Any] | None = None,
                 on_wait: WaitCallback | None = None, **overrides) -> list[Reconstruction]:
        """Both stages from predicted features ({name: (n, *shape)}); one :class:`Reconstruction` per row.

        ``on_wait(position)``: see :class:`GenerationQueue` (generations run one at a time, in arrival order).
        """
        s1, s2 = self.stage_configs(overrides)
        n = len(features["vdvae"])
        if len(seeds) != n or len(keys) != n:
            raise ValueError(f"'seeds' and 'keys' must hold one entry per item ({n}); got {len(seeds)} and {len(keys)}")
        seeds = [int(s) for s in seeds]
        stage1, upscaled, final, t_stage1, t_stage2 = self.models.generate(
            features, seeds=seeds, stage1=s1, stage2=s2, run_stage2=run_stage2, callback=callback,
            preview_every=preview_every, on_wait=on_wait)
        timings = {"features": feature_seconds, "stage1": t_stage1, "stage2": t_stage2,
                   "total": feature_seconds + t_stage1 + t_stage2}
        settings = {"temperature": s1.temperature, "stage1_output": s1.output, "strength": s2.strength, "guidance_scale": s2.guidance_scale,
                    "vision_mix": s2.vision_mix, "num_inference_steps": s2.num_inference_steps,
                    "denoising_steps": s2.denoising_steps, "start_noise_offset": s2.start_noise_offset,
                    "unconditional_grey": s2.unconditional_grey, "truncate_output": s2.truncate_output,
                    **(extra_settings or {})}
        return [
            Reconstruction(key=keys[i], seed=seeds[i], stage1=stage1[i], stage1_upscaled=upscaled[i],
                           final=None if final is None else final[i],
                           features={k: np.asarray(v[i]) for k, v in features.items()},
                           timings=dict(timings), settings=dict(settings))
            for i in range(n)
        ]


#: ``scale`` options of :meth:`BrainDiffuser.pattern_features`
PATTERN_SCALES: tuple[str, ...] = ("quantile", "train", "paper")
#: the authors' hand-set norms of the pattern-driven part (``roi_generate_features.py``)
PAPER_PATTERN_NORMS: dict[str, float] = {"vdvae": 50.0, "clip_text": 9.0, "clip_vision": 15.0}
#: the authors' final norm of the VDVAE ROI features, after their z-scoring across patterns
PAPER_VDVAE_FINAL_NORM = 80.0


def pattern_driven_features(decoder, patterns: np.ndarray, *, scale: str = "quantile",
                            feature: str = "vdvae") -> np.ndarray:
    """ROI-optimal features of one subject and feature space: intercept + scaled pattern-driven part.

    decoder : a :class:`~brain_diffuser_core.ridge.RidgeDecoder`; patterns : float32 (n, n_voxels).
    ``d = predict(p) - predict(0)`` (= ``p @ W``) is set to a norm (see
    :meth:`BrainDiffuser.pattern_features`) and added to ``predict(0)`` (the intercept).
    Returns float32 (n, n_targets).
    """
    if scale == "quantile" and not decoder.has_target_axes:
        _log.warning("decoder has no principal axes of its training targets (fitted before bundle format 3): "
                     "ROI features fall back to scale='train'; refit the bundle for the in-distribution scale")
        scale = "train"
    x = np.asarray(patterns, dtype=np.float32)
    both = decoder.predict(np.concatenate([x, np.zeros((1, x.shape[1]), np.float32)]), rescale="none")
    pred, intercept = both[:-1], both[-1]
    drive = pred - intercept
    length = np.linalg.norm(drive, axis=1, keepdims=True)
    unit = drive / np.maximum(length, 1e-8)
    y_std = decoder.tensors["y_std"].numpy().astype(np.float64)
    if scale == "quantile":
        z = NormalDist().inv_cdf(ROI_PATTERN_QUANTILE)
        # a pattern that drives nothing (all-zero drive) stays at the intercept
        lengths = np.array([[z * decoder.target_sd_along(row) if np.any(row) else 0.0] for row in unit])
        return (intercept + unit * lengths).astype(np.float32)
    if scale == "train":
        return (intercept + unit * float(np.sqrt((y_std ** 2).sum()))).astype(np.float32)
    out = intercept + unit * PAPER_PATTERN_NORMS[feature]
    if feature == "vdvae":  # the original then z-scores across the patterns and maps to the train statistics
        if len(out) < 2:
            raise ValueError("scale='paper' z-scores VDVAE features across the patterns and needs >= 2 of them; "
                             "1 was provided")
        y_mean = decoder.tensors["y_mean"].numpy()
        sd = out.std(0)
        out = (out - out.mean(0)) / np.where(sd > 0, sd, 1.0) * y_std + y_mean
        out = out / np.linalg.norm(out, axis=1, keepdims=True) * PAPER_VDVAE_FINAL_NORM
    return out.astype(np.float32)


def upscale_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, s, s, 3) -> uint8 (n, size, size, 3), bicubic (PIL), as the paper upscales VDVAE's 64 px."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images.copy()
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
