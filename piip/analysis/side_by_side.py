"""Two (or more) backbones timed side by side, each in a spawned process of its own (its allocations and
compiled kernels do not leak into the other's figures) while the parent alternates their steps.

On a shared machine the speed drifts by ±10 % between minutes; timing one model after the other lets that
drift land in the ratio. Interleaved, step i of every model runs within one round, in the order A B, then
B A, so a drift across the round cancels, and each round gives one time ratio. `interleave=False` times one
model after the other (for models too large to hold together on one device).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from piip.analysis.benchmark import MODES, BackboneTimer, mode_figures
from piip.models.numerics import configure_cpu_math


def _serve(backbone: dict[str, Any], settings: dict[str, Any], connection: Any) -> None:
    """The child: build the model, then answer `(method, mode)` calls on the timer until told to close."""
    try:
        configure_cpu_math()
        timer = BackboneTimer(backbone, settings)
        connection.send(("ok", None))
        while (call := connection.recv())[0] != "close":
            method, *args = call
            connection.send(("ok", getattr(timer, method)(*args)))
    except Exception as err:  # noqa: BLE001 - reported by the parent with the model's name
        connection.send(("error", f"{type(err).__name__}: {err}"))


class TimerProcess:
    """A `BackboneTimer` in a spawned process; `call` runs one of its methods there and returns the answer."""

    def __init__(self, backbone: dict[str, Any], settings: dict[str, Any]) -> None:
        self.name = backbone.get("name", "model")
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(backbone, settings, child_end), daemon=True)
        self.process.start()
        child_end.close()
        self._answer()  # built, or the build's error

    def _answer(self) -> Any:
        while not self.connection.poll(5):  # a child killed outright (out of memory) never answers
            if not self.process.is_alive():
                message = f"the measuring process died (exit code {self.process.exitcode})"
                if self.process.exitcode == -9:
                    message += (
                        ", most likely killed for lack of memory: try modes=[forward], batch_size=1 "
                        "or interleave=false"
                    )
                raise RuntimeError(f"benchmark of {self.name} failed: {message}")
        status, payload = self.connection.recv()
        if status != "ok":
            raise RuntimeError(f"benchmark of {self.name} failed: {payload}")
        return payload

    def call(self, method: str, *args: Any) -> Any:
        self.connection.send((method, *args))
        return self._answer()

    def close(self) -> None:
        if self.process.is_alive():
            self.connection.send(("close",))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


@contextmanager
def timer_processes(
    backbones: list[dict[str, Any]], settings: dict[str, Any]
) -> Iterator[list[TimerProcess]]:
    with ExitStack() as stack:
        timers = []
        for backbone in backbones:
            timer = TimerProcess(backbone, settings)
            stack.callback(timer.close)
            timers.append(timer)
        yield timers


def round_order(models: int, round_index: int) -> list[int]:
    """Forward in even rounds, backward in odd ones: A B, B A, A B, ... (a linear drift cancels in pairs)."""
    order = list(range(models))
    return order if round_index % 2 == 0 else order[::-1]


def _time_modes(timers: list[TimerProcess], settings: dict[str, Any]) -> tuple[list[dict], dict]:
    """Every mode of every timer, steps interleaved round by round: figures per model, step times per mode."""
    modes = [m for m in MODES if m in settings["modes"]]
    figures: list[dict[str, dict[str, float]]] = [{} for _ in timers]
    times: dict[str, list[list[float]]] = {}
    for mode in modes:
        for timer in timers:
            timer.call("start", mode)
            for _ in range(settings["warmup"]):
                timer.call("step", mode)
        times[mode] = [[] for _ in timers]
        for round_index in range(settings["iters"]):
            for index in round_order(len(timers), round_index):
                times[mode][index].append(timers[index].call("step", mode))
        for index, timer in enumerate(timers):
            peak = timer.call("peak_mb")
            figures[index][mode] = mode_figures(times[mode][index], peak, settings["batch_size"])
    return figures, times


def time_models(backbones: list[dict[str, Any]], settings: dict[str, Any]) -> tuple[list[dict], dict]:
    """Per model its figures per mode, and per mode the step times of every model (`[model][step]`)."""
    if settings.get("interleave", True):
        with timer_processes(backbones, settings) as timers:
            return _time_modes(timers, settings)
    figures, times = [], {}
    for backbone in backbones:
        with timer_processes([backbone], settings) as timers:
            model_figures, model_times = _time_modes(timers, settings)
        figures += model_figures
        for mode, per_model in model_times.items():
            times.setdefault(mode, []).extend(per_model)
    return figures, times
