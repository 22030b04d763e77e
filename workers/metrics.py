"""Prometheus metrics of the workers and the router (DESIGN §5); their names come from
`epd.metric_names`, which the operator and the dashboard read too."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from epd import metric_names as names

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# ---- stage workers ---------------------------------------------------------
QUEUE_DEPTH = Gauge(names.STAGE_QUEUE_DEPTH, "Work items waiting in the stage queue", ["stage"])
IN_FLIGHT = Gauge(names.STAGE_IN_FLIGHT, "Requests being handled by the stage", ["stage"])
BATCH_SIZE = Histogram(names.STAGE_BATCH_SIZE, "Items per executed batch", ["stage"], buckets=BATCH_BUCKETS)
BATCH_LIMIT = Gauge(names.STAGE_BATCH_LIMIT, "The stage's batch limit, as in its discovery record (encode: images, "
                    "prefill: tokens per step, decode: sequences per step)", ["stage"])
BUSY_SECONDS = Counter(names.STAGE_BUSY_SECONDS, "Seconds the stage spent computing (busy fraction = rate)",
                       ["stage"])
STAGE_LATENCY = Histogram(names.STAGE_LATENCY, "Time from admission to completion in the stage", ["stage"],
                          buckets=LATENCY_BUCKETS)
ENCODED_ITEMS = Counter(names.ENCODED_ITEMS, "Images or tiles run through the vision tower")
CACHE_EVENTS = Counter(names.MM_CACHE_EVENTS,
                       "Multimodal cache outcomes: hit (own memory), fetched (from the owner), "
                       "miss, recompute (fallback encode), evicted, redis_error", ["stage", "event"])
PREFIX_CACHE_TOKENS = Counter(names.PREFIX_CACHE_TOKENS,
                              "Prompt tokens at prefill: hit (KV reused from the prefix cache) or computed",
                              ["result"])
TRANSFER_BYTES = Counter(names.TRANSFER_BYTES, "Bytes moved between stages, by kind (kv, embedding, "
                         "embedding_fetch) and path (inproc, shm, cuda_ipc, nixl, tcp, grpc)", ["kind", "path"])
TRANSFER_LATENCY = Histogram(names.TRANSFER_LATENCY, "Time to move one KV cache or embedding push, from "
                             "its first byte to its last", ["kind", "path"], buckets=LATENCY_BUCKETS)
TRANSFER_WAIT = Histogram(names.TRANSFER_WAIT, "Time a request's first token waited on the KV handoff "
                          "after its prefill compute ended (what the layer-wise overlap did not hide)", ["path"],
                          buckets=LATENCY_BUCKETS)
KV_USAGE = Gauge(names.KV_CACHE_USAGE, "Fraction of the decode KV capacity in use")
KV_TOKENS = Gauge(names.KV_CACHE_TOKENS, "Tokens held in the decode KV cache")

# ---- router ------------------------------------------------------------------
TTFT = Histogram(names.REQUEST_TTFT, "Time to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram(names.REQUEST_TPOT, "Inter-token latency after the first token", buckets=LATENCY_BUCKETS)
E2E = Histogram(names.REQUEST_E2E, "End-to-end request latency", buckets=LATENCY_BUCKETS)
REQUESTS = Counter(names.REQUESTS, "Requests by outcome", ["outcome"])
ROUTER_IN_FLIGHT = Gauge(names.ROUTER_IN_FLIGHT, "Requests in flight in the router")
PROMPT_TOKENS = Counter(names.PROMPT_TOKENS, "Prompt tokens admitted")
COMPLETION_TOKENS = Counter(names.COMPLETION_TOKENS, "Completion tokens generated")
IMAGES = Counter(names.REQUEST_IMAGES, "Images received by the router")
ROUTER_CANCELS = Counter(names.ROUTER_CANCELS,
                         "Cancel RPCs a stage acknowledged (it held the request when the client left or the "
                         "attempt was abandoned)", ["stage"])
ROUTER_RECOVERIES = Counter(names.ROUTER_RECOVERIES,
                            "Requests that survived a lost worker: retry (before the first token, on a sibling) "
                            "or resume (decode lost mid-stream: re-prefilled and continued)", ["kind"])
