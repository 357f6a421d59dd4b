"""StepTimer: wall-time split of LLMEngine.step() into host and device parts, without touching the engine.

It wraps, on one engine instance (and restores on `close()`):
  scheduler.schedule             -> "schedule"  (host: continuous-batching decisions, block allocation)
  runner._copy_blocks            -> "cow_copy"  (copy-on-write block copies; device, usually empty)
  jaxpaged.runner.build_step_inputs -> "inputs" (host: flat ragged numpy arrays)
  runner._sampling               -> "sampling_inputs" (host: SamplingTensors.build)
  runner._run                    -> "device"    (the jitted step, block_until_ready: host->device
                                                 transfer + dispatch + model + sampling)
  engine.step                    -> "step"      (all of it; "other" = step - the parts above:
                                                 device->host copy, scheduler update, detokenize, outputs)
The engine already blocks on the step's result right after `_run` (device_get), so waiting inside
the wrapper moves no work and changes no behaviour; it only puts the wait on the right clock.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import jax
import numpy as np

PARTS = ("schedule", "inputs", "sampling_inputs", "cow_copy", "device", "other")


@dataclass
class StepRecord:
    num_tokens: int = 0        # real tokens in the step
    num_seqs: int = 0          # real sequences
    tokens_padded: int = 0     # T bucket
    seqs_padded: int = 0       # B bucket
    context: int = 0           # sum of the sequences' context lengths (seq_lens)
    times: dict = field(default_factory=lambda: defaultdict(float))   # part -> seconds

    @property
    def is_decode(self) -> bool:
        return self.num_seqs > 0 and self.num_tokens == self.num_seqs


class StepTimer:
    def __init__(self, engine):
        import jaxpaged.runner as runner_mod

        self.engine, self.records = engine, []
        self._runner_mod = runner_mod
        self._current: StepRecord | None = None
        runner, sched = engine.runner, engine.scheduler
        self._saved = [(engine, "step", engine.step), (sched, "schedule", sched.schedule),
                       (runner, "_copy_blocks", runner._copy_blocks), (runner, "_sampling", runner._sampling),
                       (runner, "_run", runner._run)]
        self._saved_build = runner_mod.build_step_inputs
        engine.step = self._wrap_step(engine.step)
        sched.schedule = self._timed("schedule", sched.schedule)
        runner._copy_blocks = self._timed("cow_copy", runner._copy_blocks)
        runner._sampling = self._timed("sampling_inputs", runner._sampling)
        runner._run = self._timed("device", runner._run, block=True)
        runner_mod.build_step_inputs = self._timed("inputs", self._saved_build, record_shape=True)

    def close(self) -> None:
        for obj, name, _ in self._saved:
            obj.__dict__.pop(name, None)       # drop the instance attribute: the class method shows again
        self._runner_mod.build_step_inputs = self._saved_build

    def _wrap_step(self, step):
        def timed_step():
            rec = self._current = StepRecord()
            t0 = time.perf_counter()
            try:
                return step()
            finally:
                total = time.perf_counter() - t0
                rec.times["step"] = total
                rec.times["other"] = total - sum(rec.times[p] for p in PARTS if p != "other")
                self._current = None
                if rec.num_seqs:
                    self.records.append(rec)
        return timed_step

    def _timed(self, part: str, fn, block: bool = False, record_shape: bool = False):
        def wrapper(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            if block:
                jax.block_until_ready(out)
            rec = self._current
            if rec is not None:
                rec.times[part] += time.perf_counter() - t0
                if block:   # CPU seconds of all threads: robust to other processes sharing the cores
                    rec.times[part + "_cpu"] += time.process_time() - c0
                if record_shape:
                    rec.num_tokens, rec.num_seqs = out.num_tokens, out.num_seqs
                    rec.tokens_padded, rec.seqs_padded = len(out.token_ids), len(out.seq_lens)
                    rec.context = int(out.seq_lens.sum())
            return out
        return wrapper

    # ---- reports --------------------------------------------------------------------------------
    def summary(self, records: list[StepRecord] | None = None) -> dict:
        """{part: total seconds}, plus steps, tokens, padded tokens and mean step ms."""
        recs = self.records if records is None else records
        out = {p: float(sum(r.times[p] for r in recs)) for p in PARTS + ("step",)}
        out.update(steps=len(recs), tokens=sum(r.num_tokens for r in recs),
                   tokens_padded=sum(r.tokens_padded for r in recs),
                   seqs=sum(r.num_seqs for r in recs), seqs_padded=sum(r.seqs_padded for r in recs))
        out["device_cpu"] = float(sum(r.times["device_cpu"] for r in recs))
        out["mean_step_ms"] = 1e3 * out["step"] / max(1, len(recs))
        return out

    def format(self, title: str = "step time split") -> str:
        lines = [f"{title}:"]
        for name, recs in (("all steps", self.records),
                           ("decode-only steps", [r for r in self.records if r.is_decode]),
                           ("steps with prefill", [r for r in self.records if not r.is_decode])):
            if not recs:
                continue
            s = self.summary(recs)
            total = s["step"] or 1.0
            parts = "  ".join(f"{p} {100 * s[p] / total:4.1f}%" for p in PARTS)
            lines.append(f"  {name:<19} {s['steps']:>5} steps, {s['mean_step_ms']:8.2f} ms/step, "
                         f"tokens {s['tokens']} (padded to {s['tokens_padded']}), "
                         f"seqs {s['seqs']} (padded to {s['seqs_padded']})")
            lines.append(f"  {'':<19} {parts}; device CPU time {1e3 * s['device_cpu'] / max(1, s['steps']):.1f} ms/step")
        return "\n".join(lines)

    def by_bucket(self) -> list[tuple[tuple[int, int], int, float, float]]:
        """[((T, B), steps, mean device ms, mean host ms)] sorted by total device time."""
        groups = defaultdict(list)
        for r in self.records:
            groups[(r.tokens_padded, r.seqs_padded)].append(r)
        rows = []
        for key, recs in groups.items():
            dev = np.mean([r.times["device"] for r in recs]) * 1e3
            host = np.mean([r.times["step"] - r.times["device"] for r in recs]) * 1e3
            rows.append((key, len(recs), float(dev), float(host)))
        rows.sort(key=lambda x: -x[1] * x[2])
        return rows
