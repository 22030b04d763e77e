"""Prometheus metrics of every process, names prefixed `epd_` (DESIGN §5)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# ---- stage workers ---------------------------------------------------------
QUEUE_DEPTH = Gauge("epd_stage_queue_depth", "Work items waiting in the stage queue", ["stage"])
IN_FLIGHT = Gauge("epd_stage_in_flight", "Requests being handled by the stage", ["stage"])
BATCH_SIZE = Histogram("epd_stage_batch_size", "Items per executed batch", ["stage"], buckets=BATCH_BUCKETS)
BUSY_SECONDS = Counter("epd_stage_busy_seconds_total", "Seconds the stage spent computing (busy fraction = rate)",
                       ["stage"])
STAGE_LATENCY = Histogram("epd_stage_latency_seconds", "Time from admission to completion in the stage", ["stage"],
                          buckets=LATENCY_BUCKETS)
ENCODED_ITEMS = Counter("epd_encode_items_total", "Images or tiles run through the vision tower")
CACHE_EVENTS = Counter("epd_mm_cache_events_total",
                       "Multimodal cache outcomes: hit (own memory), fetched (from the owner), "
                       "miss, recompute (fallback encode), evicted, redis_error", ["stage", "event"])
PREFIX_CACHE_TOKENS = Counter("epd_prefix_cache_tokens_total",
                              "Prompt tokens at prefill: hit (KV reused from the prefix cache) or computed",
                              ["result"])
TRANSFER_BYTES = Counter("epd_transfer_bytes_total", "Bytes moved between stages, by kind (kv, embedding, "
                         "embedding_fetch) and path (inproc, shm, cuda_ipc, nixl, grpc)", ["kind", "path"])
TRANSFER_LATENCY = Histogram("epd_transfer_latency_seconds", "Time to move one KV cache or embedding push, from "
                             "its first byte to its last", ["kind", "path"], buckets=LATENCY_BUCKETS)
TRANSFER_WAIT = Histogram("epd_transfer_wait_seconds", "Time a request's first token waited on the KV handoff "
                          "after its prefill compute ended (what the layer-wise overlap did not hide)", ["path"],
                          buckets=LATENCY_BUCKETS)
KV_USAGE = Gauge("epd_kv_cache_usage_ratio", "Fraction of the decode KV capacity in use")
KV_TOKENS = Gauge("epd_kv_cache_tokens", "Tokens held in the decode KV cache")

# ---- router ------------------------------------------------------------------
TTFT = Histogram("epd_request_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram("epd_request_tpot_seconds", "Inter-token latency after the first token", buckets=LATENCY_BUCKETS)
E2E = Histogram("epd_request_e2e_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS)
REQUESTS = Counter("epd_requests_total", "Requests by outcome", ["outcome"])
ROUTER_IN_FLIGHT = Gauge("epd_router_in_flight", "Requests in flight in the router")
PROMPT_TOKENS = Counter("epd_prompt_tokens_total", "Prompt tokens admitted")
COMPLETION_TOKENS = Counter("epd_completion_tokens_total", "Completion tokens generated")
IMAGES = Counter("epd_request_images_total", "Images received by the router")
ROUTER_CANCELS = Counter("epd_router_cancels_total",
                         "Cancel RPCs a stage acknowledged (it held the request when the client left or the "
                         "attempt was abandoned)", ["stage"])
ROUTER_RECOVERIES = Counter("epd_router_recoveries_total",
                            "Requests that survived a lost worker: retry (before the first token, on a sibling) "
                            "or resume (decode lost mid-stream: re-prefilled and continued)", ["kind"])
