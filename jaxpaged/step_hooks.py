"""Step hooks: the public way to observe an engine step (profilers, benchmarks), without rebinding
any internals.

`LLMEngine.add_step_hook(hook)` registers an object with any of these methods (all optional):

  begin_step()                          before a step starts
  end_step()                            after it ended (outputs built)
  begin_part(name) / end_part(name, seconds, cpu_seconds)
                                        around each part of the step, in order:
      "schedule"         host: continuous-batching decisions, block allocation
      "cow_copy"         device: copy-on-write block copies (usually none)
      "inputs"           host: the flat ragged numpy arrays (step_inputs.py)
      "sampling_inputs"  host: SamplingTensors.build
      "device"           the jitted step, waited for (host->device copy, dispatch, model, sampling)
  on_inputs(inputs, sampling)           the StepInputs and SamplingTensors of the step, once built

With a hook registered the runner waits for the device inside the "device" part (the engine waits
for the step's result right after anyway: no work moves, only the wait lands on the right clock).
Hooks see the step; they must not change it.
"""
from __future__ import annotations

import contextlib
import time


class StepHooks:
    """The engine's registered hooks, called in registration order (shared with the runner)."""

    def __init__(self):
        self._hooks: list = []

    def add(self, hook) -> None:
        self._hooks.append(hook)

    def remove(self, hook) -> None:
        self._hooks.remove(hook)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def _call(self, method: str, *args) -> None:
        for hook in self._hooks:
            fn = getattr(hook, method, None)
            if fn is not None:
                fn(*args)

    @contextlib.contextmanager
    def step(self):
        self._call("begin_step")
        try:
            yield
        finally:
            self._call("end_step")

    @contextlib.contextmanager
    def part(self, name: str):
        """Times the enclosed part of a step (wall and process CPU seconds) for the hooks."""
        if not self._hooks:
            yield
            return
        self._call("begin_part", name)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._call("end_part", name, time.perf_counter() - t0, time.process_time() - c0)

    def inputs(self, inputs, sampling) -> None:
        self._call("on_inputs", inputs, sampling)
