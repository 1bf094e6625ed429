"""Small helpers shared by the command-line entry points: argument parsing, and errors a user can fix told in
one line instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from piip.errors import CheckpointError, ConfigError, DataError

# What a user's input can cause: our own errors, and Hydra's/OmegaConf's for overrides and config values.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    HydraException,
    OmegaConfBaseException,
)
T = TypeVar("T")
R = TypeVar("R")
_OMEGACONF_DETAIL = re.compile(r"^(full_key|object_type|reference_type)\s*[:=]")
_SEARCH_PATH = "Config search path:"

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


# -- errors a user can fix: one line on stderr ---------------------------------------------------------------
def one_line(err: BaseException) -> str:
    """An error's message on one line: Hydra's override errors with their OmegaConf cause, a missing config
    option with the options there are, without OmegaConf's `full_key:`/`object_type=` detail lines."""
    text = str(err)
    if isinstance(err, HydraException) and isinstance(err.__cause__, OmegaConfBaseException):
        text += "\n" + str(err.__cause__)  # what Hydra prints itself: "Could not override 'x'" + the reason
    if isinstance(err, MissingConfigException):
        text = text.split(_SEARCH_PATH)[0]
    parts: list[str] = []
    for line in text.splitlines():
        item = line.strip()
        if not item or _OMEGACONF_DETAIL.match(item):
            continue
        if line.startswith("\t") and parts:  # Hydra lists the options of a group one per tabbed line
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + item
        else:
            parts.append(item)
    return "".join(
        p if i == 0 else (" " if parts[i - 1][-1] in ".:;" else "; ") + p for i, p in enumerate(parts)
    )


_reporting_tool: str | None = None  # the tool `run_tool` runs, unless the user asked for tracebacks


@contextlib.contextmanager
def user_errors_in_one_line(name: str) -> Iterator[None]:
    """Inside: a `USER_ERRORS` error ends the program: `<name>: error: <what is wrong>` on stderr, exit 1."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{name}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def run_tool(name: str, main: Callable[..., Any], *args: Any) -> NoReturn:
    """Run a tool's `main(*args)` and exit with its return code; what a user can fix (`USER_ERRORS`) is one
    line on stderr and exit code 1, never a traceback (a bug still shows one).

    Hydra prints its own errors (several lines; for an error inside the job a trimmed traceback) unless
    HYDRA_FULL_ERROR is set, when it raises them: inside this call it is set, so override errors reach
    us, and `one_line_errors` reports those of the job before Hydra adds its "Error executing job" line.
    A user who sets HYDRA_FULL_ERROR=1 asks for tracebacks and gets them.
    """
    global _reporting_tool
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise SystemExit(_exit_code(main(*args)))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _reporting_tool = name
    try:
        with user_errors_in_one_line(name):
            code = main(*args)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _reporting_tool = None
    raise SystemExit(_exit_code(code))


def one_line_errors(job: Callable[[T], R]) -> Callable[[T], R]:
    """Under `@hydra.main`: the job's user errors as one line when run by `run_tool` (raised otherwise)."""

    @functools.wraps(job)
    def reporting(cfg: T) -> R:
        if _reporting_tool is None:
            return job(cfg)
        with user_errors_in_one_line(_reporting_tool):
            return job(cfg)

    return reporting


def _exit_code(returned: Any) -> int:
    return returned if isinstance(returned, int) else 0


def key_value_args(
    argv: Iterable[str], required: Iterable[str], optional: Iterable[str], usage: str
) -> dict[str, Any]:
    """`key=value` arguments as strings, checked against the keys a tool takes (`-h`/`--help` prints
    `usage`); a wrong one is a `ConfigError` that names it and repeats the usage."""
    required = list(required)
    known = {*required, *optional}
    args: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep or key not in known:
            expected = ", ".join(sorted(known))
            raise ConfigError(
                f"unknown argument {arg!r} (expected key=value with a key among {expected}); {usage}"
            )
        if value:  # `key=` alone: as if not given
            args[key] = value
    missing = [f"{key}=" for key in required if not args.get(key)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; {usage}")
    return args


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line (`prog: error: …; see --help`), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
