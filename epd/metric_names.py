"""Every Prometheus metric name of epd-serve (DESIGN §5), defined once and free of
dependencies: the workers and the router define their metrics with these names
(epd.workers.metrics), the operator's scaler queries them (direct scrapes and
PromQL) and defines its own, and the chart's Grafana dashboard is tested to use
only these. A histogram's series add `_bucket`, `_sum` and `_count`."""

from __future__ import annotations

# ---- stage workers: label `stage` (encode | prefill | decode)
STAGE_QUEUE_DEPTH = "epd_stage_queue_depth"
STAGE_IN_FLIGHT = "epd_stage_in_flight"
STAGE_BATCH_SIZE = "epd_stage_batch_size"
STAGE_BATCH_LIMIT = "epd_stage_batch_limit"  # the discovery record's batch_limit, for whoever scrapes
STAGE_BUSY_SECONDS = "epd_stage_busy_seconds_total"
STAGE_LATENCY = "epd_stage_latency_seconds"
ENCODED_ITEMS = "epd_encode_items_total"
MM_CACHE_EVENTS = "epd_mm_cache_events_total"
PREFIX_CACHE_TOKENS = "epd_prefix_cache_tokens_total"
TRANSFER_BYTES = "epd_transfer_bytes_total"
TRANSFER_LATENCY = "epd_transfer_latency_seconds"
TRANSFER_WAIT = "epd_transfer_wait_seconds"
KV_CACHE_USAGE = "epd_kv_cache_usage_ratio"
KV_CACHE_TOKENS = "epd_kv_cache_tokens"

# ---- router
REQUEST_TTFT = "epd_request_ttft_seconds"
REQUEST_TPOT = "epd_request_tpot_seconds"
REQUEST_E2E = "epd_request_e2e_seconds"
REQUESTS = "epd_requests_total"
ROUTER_IN_FLIGHT = "epd_router_in_flight"
PROMPT_TOKENS = "epd_prompt_tokens_total"
COMPLETION_TOKENS = "epd_completion_tokens_total"
REQUEST_IMAGES = "epd_request_images_total"
ROUTER_CANCELS = "epd_router_cancels_total"
ROUTER_RECOVERIES = "epd_router_recoveries_total"

# ---- operator
OPERATOR_RECONCILES = "epd_operator_reconciles_total"
OPERATOR_RECONCILE_SECONDS = "epd_operator_reconcile_seconds"
OPERATOR_APPLY_ERRORS = "epd_operator_apply_errors_total"
OPERATOR_PRUNED = "epd_operator_pruned_total"
OPERATOR_SCALING_DECISIONS = "epd_operator_scaling_decisions_total"
OPERATOR_SLO_SECONDS = "epd_operator_slo_seconds"
OPERATOR_DEPLOYMENTS = "epd_operator_deployments"
OPERATOR_LEADER = "epd_operator_leader"

# ---- labels the chart's PodMonitor/ServiceMonitor put on every scraped series
DEPLOYMENT_LABEL = "epd_deployment"  # the EPDDeployment's name
COMPONENT_LABEL = "epd_component"  # router | encode | prefill | decode

ALL = frozenset(value for name, value in dict(globals()).items()
                if name.isupper() and isinstance(value, str) and not name.endswith("_LABEL"))
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def base_name(series: str) -> str:
    """The metric a series belongs to: `epd_request_ttft_seconds_bucket` -> `epd_request_ttft_seconds`."""
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in ALL:
            return series.removesuffix(suffix)
    return series
