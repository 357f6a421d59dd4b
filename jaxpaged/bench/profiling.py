"""StepTimer: wall-time split of LLMEngine.step() into host and device parts, through the engine's
public step hooks (jaxpaged/step_hooks.py: nothing is rebound).

Parts (step_hooks names them): "schedule", "cow_copy", "inputs", "sampling_inputs", "device" (the
jitted step, waited for); "step" is all of it and "other" = step - the parts (device->host copy,
scheduler update, detokenize, outputs).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

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
    """A step hook that records one StepRecord per step with work (registered on construction)."""

    def __init__(self, engine):
        self.engine, self.records = engine, []
        self._current: StepRecord | None = None
        self._t0 = 0.0
        engine.add_step_hook(self)

    def close(self) -> None:
        self.engine.remove_step_hook(self)

    # ---- the hook ------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._current, self._t0 = StepRecord(), time.perf_counter()

    def end_step(self) -> None:
        rec, total = self._current, time.perf_counter() - self._t0
        rec.times["step"] = total
        rec.times["other"] = total - sum(rec.times[p] for p in PARTS if p != "other")
        self._current = None
        if rec.num_seqs:
            self.records.append(rec)

    def end_part(self, name: str, seconds: float, cpu_seconds: float) -> None:
        rec = self._current
        if rec is not None:
            rec.times[name] += seconds
            if name == "device":   # CPU seconds of all threads: robust to other processes sharing the cores
                rec.times["device_cpu"] += cpu_seconds

    def on_inputs(self, inputs, sampling) -> None:
        rec = self._current
        if rec is not None:
            rec.num_tokens, rec.num_seqs = inputs.num_tokens, inputs.num_seqs
            rec.tokens_padded, rec.seqs_padded = len(inputs.token_ids), len(inputs.seq_lens)
            rec.context = int(inputs.seq_lens.sum())

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
