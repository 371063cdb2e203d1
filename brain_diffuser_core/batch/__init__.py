"""The batch layer every long command runs on: a deterministic shard plan, atomic shard commits with a
fingerprinted manifest (finished shards skipped, other settings refused), and two engines: ``local`` (this
process; the default, Ray is never imported) and ``ray`` (model-holding Ray actors, embedded or on a cluster).

* :mod:`.plan`: items and shards; :mod:`.store`: the output folder, shard records, the index;
* :mod:`.engine`: :func:`run_job`, the local engine, :func:`run_shard` (shared by both engines);
* :mod:`.ray_engine`: the Ray engine; :mod:`.reader`: a finished (or partial) folder read back for the app;
* jobs: :mod:`.extract` (features), :mod:`.fit` (decoders per subject), :mod:`.reconstruct` (test trials),
  :mod:`.evaluate` (the metrics' reconstructions), :mod:`.sweep` (ROI-optimal scenes), :mod:`.validate`
  (``world validate``'s scenes); :mod:`._worker`: the workers' shared setup (threads, models, subjects).
"""
from .engine import BatchSummary, LocalEngine, parse_part, run_job, run_shard
from .plan import Item, Shard, fingerprint, plan_shards
from .store import BatchDiskFullError, BatchError, BatchSettingsError, ItemOutput, ShardStore

__all__ = ["Item", "Shard", "plan_shards", "fingerprint", "ItemOutput", "ShardStore", "BatchError",
           "BatchSettingsError", "BatchDiskFullError", "LocalEngine", "run_job", "run_shard", "BatchSummary",
           "parse_part"]
