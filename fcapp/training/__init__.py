"""Training: SFT, DPO, GRPO and iterative rounds, each run in a worker process with its own run folder.

    config.py  TrainConfig, the documented options (CLI flags and the Train tab's defaults come from it)
    job.py     start a run, follow it, stop it, find it again (the caller's side)
    worker.py  the worker process: runs one config, writes the run folder (folder.py)
    sft.py, dpo.py, grpo.py, rounds.py   the methods; common.py what they share; tokens.py chain -> tokens + mask
"""

from fcapp.training.config import TERMINAL, TrainConfig
from fcapp.training.job import TrainingJob, attach, list_runs, start_training

__all__ = ["TERMINAL", "TrainConfig", "TrainingJob", "attach", "list_runs", "start_training"]
