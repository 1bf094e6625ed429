"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import re
import sys

_RESOLUTION = re.compile(r"^(\+{0,2}resolution=)([\d_,]+)$")


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


def rerun_only_this_job_in_ddp_children() -> None:
    """Make DDP ranks > 0 of a multirun job re-run this one job, not the whole sweep.

    Lightning starts ranks > 0 by re-running `sys.argv` plus `hydra.run.dir=<run dir>`; in a multirun that
    would launch every job of the sweep again in every child. Replacing the argument list with this job's
    own overrides (no `-m`) and pointing the run directory at the job's folder makes each child compose
    exactly its parent's job config. SLURM launches (hydra/launcher=submitit_slurm) start every rank
    themselves and are unaffected.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    OmegaConf.set_readonly(hydra_cfg, True)
