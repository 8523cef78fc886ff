"""One process of tests/test_distributed.py::test_a_non_finite_gradient_part_in_one_process_stops_every_process.

Each process holds its own part of the gradients (as under FSDP): only process 1's part is NaN. Every process runs
the NaN guard's check on its part; all must stop, at the same step. Writes OUT/rank<N>.json: the error each raised.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from finetune.stages.common import NonFiniteTraining, refuse_non_finite


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    part = torch.ones(4)
    if rank == 1:
        part[2] = float("nan")
    try:
        refuse_non_finite([("layers.0.q_proj.lora_A", part)], step=5, checkpoints=out / "checkpoints", agree=True)
        raised = None
    except NonFiniteTraining as error:
        raised = str(error)
    (out / f"rank{rank}.json").write_text(json.dumps({"raised": raised}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
