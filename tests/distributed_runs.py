"""Training runs for tests/test_distributed.py, in float64: ``python distributed_runs.py RUNS.json``
in one process, or under ``torch.distributed.run`` as every rank of a data-parallel run.

RUNS.json holds a list of ``{"args": [...], "resume": RUN_DIR or null}``; each entry is one
``rlmem train`` (resolved from the embedded default) run in turn, in one process group (joined here
once: a group cannot be re-created after ``train`` destroys the one it created).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rlmem import config as cfg
from rlmem.train import resume_config, train

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    for run in json.loads(Path(sys.argv[1]).read_text()):
        if run.get("resume"):
            train(resume_config(Path(run["resume"]), run["args"]), resume=True, log=lambda *a: None)
        else:
            train(cfg.load(None, run["args"]), log=lambda *a: None)
