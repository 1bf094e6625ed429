"""Cluster jobs through submitit (conf/cluster/slurm.yaml, conf/cluster/submitit_local.yaml).

submitit (behind hydra-submitit-launcher) answers its preemption/time-limit signal (SIGUSR2 unless
SUBMITIT_PREEMPT_SIGNAL says otherwise) by requeueing the job at once, in the middle of a training step and
without saving it. `RequeueOnPreemption` defers that: the signal only records the request, the next optimizer
step finishes, every rank saves `last.ckpt` together, and only then is submitit's own handler called to
requeue. The requeued job runs with the same arguments in the same run folder, and `ckpt_path: last` resumes
it at that step.

`SubmititEnvironment` lets the local executor start one process per device, as srun does on SLURM.
"""

from __future__ import annotations

import logging
import os
import signal
import zlib
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import ClusterEnvironment

log = logging.getLogger(__name__)

_Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL, SIG_IGN or None


def submitit_signal() -> signal.Signals | None:
    """The signal submitit requeues on, when this process is a submitit job; None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def _job_environment() -> Any:
    import submitit

    return submitit.JobEnvironment()


class SubmititEnvironment(ClusterEnvironment):
    """Ranks from submitit's job environment: each task the executor starts is one rank (`tasks_per_node` =
    `trainer.devices`), so Lightning starts no processes of its own.

    For cluster=submitit_local: Lightning's own launcher would start ranks > 0 by re-running the command line,
    which under submitit is `python -m submitit.core._submit FOLDER` and cannot compose the job. (SLURM jobs
    use Lightning's SLURMEnvironment.) The rendezvous port is derived from the job id, like SLURMEnvironment
    does, so the jobs of a sweep that run at the same time do not collide; MASTER_PORT overrides it.
    """

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        job = _job_environment()
        return "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]

    @property
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return int(os.environ["MASTER_PORT"])
        return 20000 + zlib.crc32(_job_environment().job_id.encode()) % 20000

    @staticmethod
    def detect() -> bool:
        return bool(os.environ.get("SUBMITIT_EXECUTOR"))

    def world_size(self) -> int:
        return _job_environment().num_tasks

    def set_world_size(self, size: int) -> None:
        """The job's task count decides; Lightning's value is checked in `validate_settings`."""

    def global_rank(self) -> int:
        return _job_environment().global_rank

    def set_global_rank(self, rank: int) -> None:
        """The job's task index decides."""

    def local_rank(self) -> int:
        return _job_environment().local_rank

    def node_rank(self) -> int:
        return _job_environment().node

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        tasks = _job_environment().num_tasks
        if num_devices * num_nodes != tasks:
            raise ValueError(
                f"trainer.devices={num_devices} x trainer.num_nodes={num_nodes} does not match the {tasks} "
                "tasks of this submitit job: set hydra.launcher.tasks_per_node to trainer.devices"
            )


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where `ckpt_path=last` will look: the file of the `save_last` ModelCheckpoint, which then keeps
    overwriting it after the resume (instead of starting a last-v1.ckpt next to it)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            if not callback.last_model_path:
                name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
                callback.last_model_path = str(Path(callback.dirpath, name))
            return Path(callback.last_model_path)
    return Path(trainer.default_root_dir, "checkpoints", "last.ckpt")


class RequeueOnPreemption(L.Callback):
    """Inside a submitit job: save the training state before submitit requeues the job.

    From `setup` (before any data loader worker is forked, so workers inherit it) to the end of fit, the
    signal only sets a flag. At the end of the next optimizer step (or at the end of training, when the signal
    came during the last validation) the ranks agree whether any of them got it, all of them take part in
    saving (a collective under FSDP), and then submitit's handler runs: on global rank 0 it pickles the
    resubmission, requeues the job (local executor: exit code 144; SLURM: `scontrol requeue`) and exits.
    submitit's handler does nothing on other ranks; they exit here too, so that no rank waits in a collective
    for a rank 0 that is gone (SLURM's requeue ends the allocation anyway; the local executor's controller
    ends a job when all its tasks have exited).

    Outside a submitit job (no SUBMITIT_EXECUTOR in the environment) it does nothing. The signal must leave
    enough time for the rest of a step, a validation pass and the save (`hydra.launcher.signal_delay_s`).
    """

    def __init__(self) -> None:
        self._signal: signal.Signals | None = None
        self._previous: _Handler = None
        self._deferring = False
        self.requested = False

    # -- the signal ---------------------------------------------------------------------------------------
    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self._deferring:  # outside fit (or left installed by Lightning's teardown): submitit's way
            self._hand_over(signum, frame)
            return
        self.requested = True
        log.warning("received %s: saving and requeueing after the current step", signal.Signals(signum).name)

    def _hand_over(self, signum: int, frame: FrameType | None) -> None:
        """What the signal would have done without this callback."""
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous not in (None, signal.SIG_IGN):  # default action (terminate): deliver it again
            signal.signal(signum, self._previous)
            os.kill(os.getpid(), signum)

    def _install(self) -> None:
        self._signal = submitit_signal()
        if self._signal is None or self._deferring:
            return
        self._previous = signal.getsignal(self._signal)
        signal.signal(self._signal, self._record)
        self._deferring, self.requested = True, False

    def _uninstall(self) -> None:
        self._deferring = False
        if self._signal is not None and signal.getsignal(self._signal) == self._record:
            signal.signal(self._signal, signal.SIG_DFL if self._previous is None else self._previous)

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._deferring and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._save_and_requeue_if_requested(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferring:
            self._save_and_requeue_if_requested(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()

    def _save_and_requeue_if_requested(self, trainer: L.Trainer) -> None:
        # every rank calls the reduction at the same steps, so they all take the same branch
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.warning("preempted: saved %s at global step %d; requeueing", path, trainer.global_step)
        self._deferring = False
        self._hand_over(self._signal, None)  # rank 0: requeues and exits (SystemExit)
        raise SystemExit(0)  # ranks > 0, or a handler that returned
