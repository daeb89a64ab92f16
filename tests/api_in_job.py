"""Run under torchrun: distmerge.merge() as a stage of a job that already has a process group.
python api_in_job.py SOURCE TARGET RESULT_JSON"""
import json
import sys

import torch.distributed as dist

import distmerge

dist.init_process_group("gloo")
result = distmerge.merge(sys.argv[1], sys.argv[2], max_shard_size="60KB", progress=False)
dist.barrier()  # the job's group is still alive after the merge
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(result.to_dict(), f)
dist.destroy_process_group()
