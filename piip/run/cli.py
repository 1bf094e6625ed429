"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

_RESOLUTION = re.compile(r"^(\+{0,2}(?:baseline_)?resolution=)([\d_,]+)$")


def quote_resolution_overrides(argv: list[str] | None = None) -> list[str]:
    """Let `resolution=1568_896_448` (and sweeps `resolution=A,B`) name config files.

    Hydra's override grammar reads `1568_896_448` as the integer 1568896448 (underscores are digit
    separators), which cannot select a config group option; quoting each value keeps it a file name.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        match = _RESOLUTION.match(arg)
        if match:
            values = ",".join(f"'{v}'" for v in match.group(2).split(",") if v)
            argv[i] = match.group(1) + values
    return argv


@contextlib.contextmanager
def one_job_of_a_multirun() -> Iterator[None]:
    """Make a multirun job with subprocess DDP behave like a single run, and clean up after it.

    Lightning starts ranks > 0 by re-running `sys.argv` plus `hydra.run.dir=<run dir>`; in a multirun that
    would launch the whole sweep again in every child. Inside this block the argument list is this job's
    own overrides (no `-m`) and the run directory is the job's folder, so each child composes exactly its
    parent's job. Afterwards the environment variables Lightning set for the launch (`LOCAL_RANK`, ...)
    and the process group are removed, or the next job would take itself for a child of the previous one.
    SLURM launches (hydra/launcher=submitit_slurm) start every rank themselves and are unaffected.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, environ = list(sys.argv), dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    OmegaConf.set_readonly(hydra_cfg, True)
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
