"""Engine-wide figures: gauges of the current state and counters since start."""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.core.scheduler import SchedulerStats
from tokenmill.distributed.kv_transfer.base import TRANSFER_SECONDS_BUCKETS, KVTransferStats


@dataclass(frozen=True)
class EngineStats:
    scheduler: SchedulerStats  # the queues and the KV cache after the last step, and their counters
    # Counters: totals since the engine started (never reset, so rates and ratios are exact).
    prompt_tokens: int  # prompt tokens of finished-or-running requests, counted once when first scheduled
    generation_tokens: int  # tokens sampled
    num_steps: int
    kv_transfer: KVTransferStats | None = None  # with a --kv-role


# ---- Prometheus ------------------------------------------------------------------------------------
# vLLM's metric names under the "tokenmill:" prefix. Engine gauges and counters are read from the
# latest EngineStats at scrape time; the latency histograms and request_success are fed from the
# RequestOutputs of each step (on the engine thread). One CollectorRegistry per server.

# NOTE: vLLM's bucket boundaries, so the two engines' histograms can be compared bucket by bucket.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class _EngineStatsCollector:
    """Gauges and counters straight from EngineStats (the engine keeps the running totals)."""

    def __init__(self, model_name: str, stats_fn) -> None:
        self.model_name = model_name
        self.stats_fn = stats_fn

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats: EngineStats = self.stats_fn()
        s = stats.scheduler
        gauges = [("num_requests_running", "Sequences in the running batch.", s.num_running),
                  ("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
                  ("num_requests_swapped", "Sequences swapped out to host memory.", s.num_swapped),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
                  ("num_requests_waiting_for_remote_kv", "Sequences pulling their prompt's KV from a prefill "
                   "instance.", s.num_waiting_for_remote_kv)]
        counters = [("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
                    ("num_preemptions", "Preemptions of running sequences.", s.num_preemptions),
                    ("prompt_tokens", "Prompt tokens processed (each sequence counted once).", stats.prompt_tokens),
                    ("generation_tokens", "Tokens generated.", stats.generation_tokens)]
        kv = stats.kv_transfer or KVTransferStats()
        counters += [("kv_transfer_blocks_sent", "KV blocks a decode instance read from this one.", kv.blocks_sent),
                     ("kv_transfer_blocks_received", "KV blocks pulled from prefill instances.", kv.blocks_received),
                     ("kv_transfer_bytes", "Bytes of KV sent plus received.", kv.bytes),
                     ("kv_transfer_leases_expired", "KV leases freed unread at their timeout.", kv.leases_expired),
                     ("kv_transfer_load_failures", "KV pulls that failed (timeout, refused, corrupted).",
                      kv.load_failures)]
        h = HistogramMetricFamily("tokenmill:kv_transfer_seconds", "Duration of successful KV pulls.",
                                  labels=["model_name"])
        bounds = [str(b) for b in TRANSFER_SECONDS_BUCKETS] + ["+Inf"]
        h.add_metric([self.model_name], list(zip(bounds, kv.seconds_buckets)), kv.seconds_sum)
        yield h
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        for name, doc, value in counters:
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c


class PrometheusMetrics:
    """The server's /metrics: an OutputListener for AsyncLLMEngine plus the engine's stats."""

    def __init__(self, model_name: str, stats_fn) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(model_name, stats_fn))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets):
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token (arrival to first token).",
                              _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive token emissions "
                             "of one sequence.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish of finished requests.",
                             _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled of finished requests.",
                               _LATENCY_BUCKETS)
        success = Counter("tokenmill:request_success", "Finished requests, by finish reason (of their first "
                          "sample; client aborts count as 'abort').", ["model_name", "finished_reason"],
                          registry=self.registry)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        # request_id -> per sample: (tokens seen, time of the last one); first_token_time seen.
        self._progress: dict[str, dict[int, tuple[int, float]]] = {}

    def on_outputs(self, outputs) -> None:
        for out in outputs:
            m = out.metrics
            if m is None:
                continue
            progress = self._progress.get(out.request_id)
            if progress is None:
                progress = self._progress[out.request_id] = {}
                if m.first_token_time is not None:
                    self.ttft.observe(m.time_to_first_token)
            now = m.last_token_time
            for c in out.outputs:
                seen, t_last = progress.get(c.index, (0, None))
                if len(c.token_ids) > seen:
                    # NOTE: one observation per step that advanced the sample (vLLM's definition),
                    # however many tokens the step added.
                    if seen > 0 and now is not None:
                        self.itl.observe(now - t_last)
                    progress[c.index] = (len(c.token_ids), now)
            if out.finished:
                del self._progress[out.request_id]
                self.e2e.observe(m.e2e_latency)
                if m.queue_time is not None:
                    self.queue.observe(m.queue_time)
                reason = out.outputs[0].finish_reason if out.outputs else "abort"
                self.success.get(reason, self.success["abort"]).inc()

    def on_abort(self, request_id: str) -> None:
        self._progress.pop(request_id, None)
        self.success["abort"].inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
