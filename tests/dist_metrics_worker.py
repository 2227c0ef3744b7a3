"""One rank of the metric-sync check (started twice by tests/test_distributed.py): each rank updates the metrics
on its shard of the pairs, then ``compute()`` syncs the states over gloo; rank 0 writes what it got."""

import json
import os
import sys

import torch.distributed as dist

from earlyexit.metrics import CorpusBLEU, RougeL


def main(pairs_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = json.loads(open(pairs_path).read())
    mine = pairs[rank::world]  # uneven on purpose: the pair count does not divide by the world size
    values = {}
    for name, metric in (("bleu", CorpusBLEU()), ("rougeL", RougeL())):
        metric.update([h for h, _ in mine], [r for _, r in mine])
        values[name] = float(metric.compute())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(values, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main(*sys.argv[1:3])
