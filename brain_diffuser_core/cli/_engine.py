"""The batch options every long command shares (engine, Ray address, shards, retries, part of a job array)."""
from __future__ import annotations

import argparse

ENGINE_HELP = """\
batch options (every long command):
  --engine local runs in this process (the default; Ray is not started). --engine ray runs the shards on a
  pool of model-holding Ray actors: an embedded local Ray, or the running cluster at --ray-address (e.g.
  'auto' inside a SLURM allocation started by deploy/slurm/ray-symmetric.sbatch). The output folder must be
  shared with the workers. Results are byte-identical between engines (same device, threads and settings).
  A rerun skips finished shards; a rerun with other settings is refused.
"""


def add_engine_arguments(p: argparse.ArgumentParser, *, shard_size: int = 4) -> None:
    g = p.add_argument_group("batch (engines, resuming, clusters)")
    g.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local = this process (default); ray = Ray actors (embedded, or --ray-address)")
    g.add_argument("--ray-address", default=None, metavar="A",
                   help="running Ray cluster: 'auto' or HOST:PORT (default: $RAY_ADDRESS, else embedded local Ray)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray actors (default: one per GPU, or per --cpus-per-worker CPUs of the cluster)")
    g.add_argument("--cpus-per-worker", type=float, default=1, metavar="C", help="CPUs each Ray actor reserves (1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs each Ray actor reserves (default: 1 for --device cuda/auto on a cluster with GPUs)")
    g.add_argument("--worker-memory-gb", type=float, default=None, metavar="GB",
                   help="host memory each Ray actor reserves (keeps big models off hosts that cannot hold them)")
    g.add_argument("--shards-in-flight", type=int, default=2, metavar="K",
                   help="shards handed to each Ray actor at once (2: no idle hand-over between shards; 1: best "
                        "balance at the end of a job of few long shards)")
    g.add_argument("--ray-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for --ray-address to answer (30)")
    g.add_argument("--shard-size", type=int, default=shard_size, metavar="K",
                   help=f"items per shard, the unit of completion and resumption ({shard_size})")
    g.add_argument("--retries", type=int, default=2, metavar="R",
                   help="extra attempts for a failing batch of items before its shard is reported failed (2)")
    g.add_argument("--part", default=None, metavar="K/N",
                   help="run only the K-th of N contiguous shard ranges (SLURM job arrays: "
                        "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    g.add_argument("--threads", type=int, default=None, metavar="T",
                   help="torch CPU threads per worker (default: torch's own; the ray engine: --cpus-per-worker)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def make_engine(args: argparse.Namespace):
    """The engine the options ask for (not started yet)."""
    from ..batch import LocalEngine, parse_part

    parse_part(args.part)  # checked before any model loads
    if args.engine == "local":
        if args.ray_address:
            raise ValueError("'--ray-address' needs '--engine ray'; the local engine runs in this process")
        return LocalEngine()
    from ..batch.ray_engine import RayEngine

    return RayEngine(args.ray_address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                     gpus_per_worker=args.gpus_per_worker, memory_gb=args.worker_memory_gb,
                     connect_timeout=args.ray_timeout, shards_in_flight=args.shards_in_flight)


def worker_threads(args: argparse.Namespace) -> int | None:
    """torch threads per worker: --threads, else (ray) the CPUs each actor reserves, else torch's default."""
    if args.threads:
        return int(args.threads)
    if args.engine == "ray":
        return max(1, int(args.cpus_per_worker))
    return None


def run_batch(make_job, args: argparse.Namespace, out=None):
    """Run the job ``make_job()`` builds into ``out`` (default ``args.out``) on the engine the options ask for;
    prints the summary and returns ``(job, summary)``. The engine starts (Ray connects) before the job loads
    anything, so a wrong --ray-address fails at once."""
    from ..batch import parse_part, run_job

    out = args.out if out is None else out
    engine = make_engine(args)
    try:
        if hasattr(engine, "start"):
            engine.start()
        job = make_job()
        summary = run_job(job, out, engine=engine, shard_size=args.shard_size, retries=args.retries,
                          part=parse_part(args.part), progress=not args.no_progress)
    finally:
        engine.close()
    extra = f"; Ray started in {engine.start_seconds:.1f} s" if getattr(engine, "start_seconds", None) else ""
    print(f"{job.kind}: {summary.computed} shard(s) computed, {summary.skipped} done already, "
          f"{len(summary.rows)} of {summary.n_items} items in {out} ({summary.seconds:.1f} s{extra})")
    return job, summary


def add_stage_arguments(p: argparse.ArgumentParser, stage1_help: str = "skip stage 2") -> None:
    """The generation settings `reconstruct` and `sweep` share (the paper's defaults, config.PAPER)."""
    from ..config import PAPER

    p.add_argument("--steps", type=int, default=PAPER.stage2.num_inference_steps, help="DDIM steps (50)")
    p.add_argument("--strength", type=float, default=PAPER.stage2.strength, help="img2img strength (0.75)")
    p.add_argument("--guidance", type=float, default=PAPER.stage2.guidance_scale, help="CFG scale (7.5)")
    p.add_argument("--vision-mix", type=float, default=PAPER.stage2.vision_mix, help="vision share of the mix (0.6)")
    p.add_argument("--stage1-only", action="store_true", help=stage1_help)


def add_mode_arguments(p: argparse.ArgumentParser, paper_extras: str = "") -> None:
    """``--rescale`` and ``--paper``, the mode switches `reconstruct` and `evaluate` share; ``paper_extras``
    (", ...") names what else ``--paper`` changes in that command."""
    p.add_argument("--rescale", default=None, choices=("train", "paper", "none"),
                   help="prediction rescaling: train = leave-one-out train statistics (default; no test peeking); "
                        "paper = z-score across the whole test set as the original (default with --paper); none")
    p.add_argument("--paper", action="store_true",
                   help="reproduce the original scripts step for step (test-set z-score, start noise t=741, grey "
                        f"127, truncated final images, sampled stage-1 pixels{paper_extras}; README 'Where this "
                        "differs'); default: the project's improvements")


def stage_overrides(args: argparse.Namespace) -> dict:
    """The stage settings of :func:`add_stage_arguments` as BrainDiffuser overrides."""
    return dict(num_inference_steps=args.steps, strength=args.strength, guidance_scale=args.guidance,
                vision_mix=args.vision_mix)
