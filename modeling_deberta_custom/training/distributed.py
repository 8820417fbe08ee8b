"""Ending a torchrun launch cleanly."""

import torch


def end_distributed_run():
    """Under torchrun, wait for rank 0's writes, then close the process group. A rank that exits with the gloo group
    still open can abort in the backend's teardown ("terminate called without an active exception", SIGABRT), which
    fails the whole launch after a finished run. Does nothing outside a distributed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
