"""The launch floor for M ranks: start torchrun, create and destroy the process group, nothing else."""
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
