"""Request metrics in the Prometheus text format (GET /metrics): requests, tokens, latency, engine state."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds


OTHER = "other"  # the endpoint label of every path the server does not serve (404s of scanners, typos)


class Metrics:
    """`endpoints`: the paths served; any other path is counted under the one label "other", so that requests for
    arbitrary paths cannot create an unbounded number of series."""

    def __init__(self, endpoints=None):
        self._lock = threading.Lock()
        self.endpoints: frozenset[str] | None = frozenset(endpoints) if endpoints is not None else None
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))

    def label(self, path: str) -> str:
        return path if self.endpoints is None or path in self.endpoints else OTHER

    def observe(self, endpoint: str, status: int, seconds: float | None = None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        endpoint = self.label(endpoint)
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if seconds is not None:
                self.latency_sum[endpoint] += seconds
                self.latency_count[endpoint] += 1
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        self.latency_buckets[endpoint][i] += 1

    def render(self, engine_stats: dict) -> str:
        out = ["# HELP medgpt_requests_total HTTP requests by endpoint and status code.", "# TYPE medgpt_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'medgpt_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            out += ["# HELP medgpt_prompt_tokens_total Prompt tokens of answered requests.", "# TYPE medgpt_prompt_tokens_total counter",
                    f"medgpt_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP medgpt_completion_tokens_total Generated tokens of answered requests.",
                    "# TYPE medgpt_completion_tokens_total counter", f"medgpt_completion_tokens_total {self.completion_tokens}",
                    "# HELP medgpt_request_latency_seconds Time from request to last token.",
                    "# TYPE medgpt_request_latency_seconds histogram"]
            for endpoint in sorted(self.latency_count):
                for bound, n in zip(BUCKETS, self.latency_buckets[endpoint]):
                    out.append(f'medgpt_request_latency_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}')
                out.append(f'medgpt_request_latency_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {self.latency_count[endpoint]}')
                out.append(f'medgpt_request_latency_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
                out.append(f'medgpt_request_latency_seconds_count{{endpoint="{endpoint}"}} {self.latency_count[endpoint]}')
        gauges = {"running": "Requests being generated now.", "waiting": "Requests queued for a batch slot.",
                  "max_batch": "The largest batch decoded so far."}
        for key, text in gauges.items():
            if key in engine_stats:
                out += [f"# HELP medgpt_engine_{key} {text}", f"# TYPE medgpt_engine_{key} gauge", f"medgpt_engine_{key} {engine_stats[key]}"]
        counters = {"cancelled": "Requests stopped because the client went away.", "generated_tokens": "Tokens the engine sampled.",
                    "decode_steps": "Batched decoding steps.", "decode_rows": "Rows summed over decoding steps (/ steps = mean batch size)."}
        for key, text in counters.items():
            if key in engine_stats:
                out += [f"# HELP medgpt_engine_{key}_total {text}", f"# TYPE medgpt_engine_{key}_total counter",
                        f"medgpt_engine_{key}_total {engine_stats[key]}"]
        return "\n".join(out) + "\n"
