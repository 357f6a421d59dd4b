"""Prometheus metrics of the server, in their own CollectorRegistry, named `jaxpaged:*` like vLLM's `vllm:*`.

Every series carries `model_name` and `engine` (the data-parallel replica index, "0" with one
engine, as vLLM labels them), so one /metrics covers all replicas. Gauges and cumulative counters
are refreshed from `engine.get_stats()` by each replica's engine thread; latency histograms are
observed per request (time to first token, time per output token after the first, end-to-end
latency) by the async engine as outputs arrive.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine stat name -> metric attribute holding a cumulative counter fed by deltas
_CUMULATIVE = {
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "num_preemptions": "preemptions",
    "prefix_cache_queries": "prefix_cache_queries",
    "prefix_cache_hits": "prefix_cache_hits",
    "spec_decode_num_drafts": "spec_decode_num_drafts",
    "spec_decode_num_draft_tokens": "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens": "spec_decode_num_accepted_tokens",
}


class ServerMetrics:
    """All metrics for one served model, over `num_engines` replicas. Thread-safe (prometheus-client is).

    `engine(i)` is replica i's EngineMetrics; the methods below act on replica 0 (a single engine).
    """

    def __init__(self, model_name: str, num_engines: int = 1):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name", "engine"]
        r = self.registry
        ProcessCollector(registry=r)     # process_resident_memory_bytes, process_cpu_seconds_total, ... (as vLLM's)
        self._families = dict(
            num_requests_running=Gauge("jaxpaged:num_requests_running", "Requests in the running batch.", labels,
                                       registry=r),
            num_requests_waiting=Gauge("jaxpaged:num_requests_waiting", "Requests waiting to be scheduled.",
                                       labels, registry=r),
            kv_cache_usage=Gauge("jaxpaged:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                                 labels, registry=r),
            prefix_cache_hit_rate=Gauge("jaxpaged:prefix_cache_hit_rate",
                                        "Prefix-cache hits / queries in tokens since start (0..1).", labels,
                                        registry=r),
            prefix_cache_queries=Counter("jaxpaged:prefix_cache_queries",
                                         "Prompt tokens looked up in the prefix cache.", labels, registry=r),
            prefix_cache_hits=Counter("jaxpaged:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                      labels, registry=r),
            preemptions=Counter("jaxpaged:num_preemptions", "Cumulative number of preemptions.", labels, registry=r),
            prompt_tokens=Counter("jaxpaged:prompt_tokens", "Prefill tokens processed.", labels, registry=r),
            generation_tokens=Counter("jaxpaged:generation_tokens", "Generation tokens processed.", labels,
                                      registry=r),
            # speculative decoding (vLLM's spec_decode names; zeros without speculative_config)
            spec_decode_num_drafts=Counter("jaxpaged:spec_decode_num_drafts",
                                           "Verifications of one sequence's draft tokens.", labels, registry=r),
            spec_decode_num_draft_tokens=Counter("jaxpaged:spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                                 labels, registry=r),
            spec_decode_num_accepted_tokens=Counter("jaxpaged:spec_decode_num_accepted_tokens",
                                                    "Draft tokens accepted.", labels, registry=r),
            spec_decode_acceptance_rate=Gauge("jaxpaged:spec_decode_draft_acceptance_rate",
                                              "Accepted / proposed draft tokens since start (0..1).", labels,
                                              registry=r),
            spec_decode_mean_acceptance_length=Gauge(
                "jaxpaged:spec_decode_mean_acceptance_length",
                "Tokens emitted per verification since start, the target's own token included.", labels, registry=r),
            ttft=Histogram("jaxpaged:time_to_first_token_seconds", "Time to first token.", labels,
                           buckets=_TTFT_BUCKETS, registry=r),
            tpot=Histogram("jaxpaged:time_per_output_token_seconds", "Time per output token after the first.",
                           labels, buckets=_TPOT_BUCKETS, registry=r),
            e2e=Histogram("jaxpaged:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                          buckets=_E2E_BUCKETS, registry=r),
        )
        self.request_success = Counter("jaxpaged:request_success", "Finished requests by finish reason.",
                                       ["model_name", "engine", "finished_reason"], registry=r)
        self.spec_decode_per_pos = Counter("jaxpaged:spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted at each draft position.",
                                           ["model_name", "engine", "position"], registry=r)
        # vLLM's vllm:lora_requests_info: one series (value: the update's time) whose labels name the adapters
        self.lora_info = Gauge("jaxpaged:lora_requests_info", "Running and waiting LoRA adapters (--enable-lora).",
                               ["model_name", "engine", "max_lora", "running_lora_adapters",
                                "waiting_lora_adapters"], registry=r)
        self.engines = [EngineMetrics(self, i) for i in range(num_engines)]

    def engine(self, index: int) -> "EngineMetrics":
        return self.engines[index]

    def update_from_stats(self, stats) -> None:
        self.engines[0].update_from_stats(stats)

    def observe_finished(self, *args) -> None:
        self.engines[0].observe_finished(*args)

    def observe_first_token(self, *args) -> None:
        self.engines[0].observe_first_token(*args)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """One replica's series (label engine="<index>"); fed by that replica's engine thread."""

    def __init__(self, server: ServerMetrics, index: int):
        self.index = index
        self._labels = (server.model_name, str(index))
        for attr, family in server._families.items():
            setattr(self, attr, family.labels(*self._labels))
        self._request_success = server.request_success
        self._spec_per_pos = server.spec_decode_per_pos
        self._lora_info = server.lora_info
        self._lora_labels: tuple | None = None
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def update_from_stats(self, stats) -> None:
        """Refreshes gauges and feeds counters the increase of each cumulative engine stat."""
        get = (stats.get if isinstance(stats, dict) else lambda k, d=None: getattr(stats, k, d))
        with self._lock:
            for attr, gauge in (("num_running", self.num_requests_running),
                                ("num_waiting", self.num_requests_waiting),
                                ("kv_cache_usage", self.kv_cache_usage)):
                value = get(attr)
                if value is not None:
                    gauge.set(float(value))
            for key, attr in _CUMULATIVE.items():
                value = get(key)
                if value is None:
                    continue
                delta = float(value) - self._last.get(key, 0.0)
                if delta > 0:
                    getattr(self, attr).inc(delta)
                self._last[key] = float(value)
            queries, hits = get("prefix_cache_queries"), get("prefix_cache_hits")
            if queries:
                self.prefix_cache_hit_rate.set(float(hits or 0) / float(queries))
            self._update_spec_decode(get)
            self._update_lora(get)

    def _update_lora(self, get) -> None:
        if not get("max_lora"):
            return
        labels = (*self._labels, str(get("max_lora")), get("running_lora_adapters") or "",
                  get("waiting_lora_adapters") or "")
        if labels != self._lora_labels and self._lora_labels is not None:
            self._lora_info.remove(*self._lora_labels)      # one series per engine: the current adapters
        self._lora_labels = labels
        self._lora_info.labels(*labels).set_to_current_time()

    def _update_spec_decode(self, get) -> None:
        """Acceptance gauges and the per-position counters (deltas of the engine's cumulative list)."""
        drafts, proposed = get("spec_decode_num_drafts"), get("spec_decode_num_draft_tokens")
        accepted = get("spec_decode_num_accepted_tokens") or 0
        if proposed:
            self.spec_decode_acceptance_rate.set(float(accepted) / float(proposed))
        if drafts:
            self.spec_decode_mean_acceptance_length.set(1.0 + float(accepted) / float(drafts))
        for pos, value in enumerate(get("spec_decode_num_accepted_tokens_per_pos") or ()):
            key = f"spec_pos_{pos}"
            delta = float(value) - self._last.get(key, 0.0)
            if delta > 0:
                self._spec_per_pos.labels(*self._labels, str(pos)).inc(delta)
            self._last[key] = float(value)

    def observe_finished(self, finish_reason: str | None, arrival: float, first_token: float | None,
                         finished: float, num_output_tokens: int) -> None:
        self._request_success.labels(*self._labels, str(finish_reason)).inc()
        self.e2e.observe(max(0.0, finished - arrival))
        if first_token is not None and num_output_tokens > 1:
            self.tpot.observe(max(0.0, finished - first_token) / (num_output_tokens - 1))

    def observe_first_token(self, arrival: float, first_token: float) -> None:
        self.ttft.observe(max(0.0, first_token - arrival))
