"""Why a stage's pods are not ready, in a line: what the kubelet reports in
their container states (a Secret not found, an image that cannot be pulled, a
crash loop with the log tail the container left as its termination message,
e.g. a model download refused by the hub)."""

from __future__ import annotations

from typing import Any

# Waiting reasons that are just progress, not a problem to report.
STARTING = {"ContainerCreating", "PodInitializing"}
MESSAGE_CHARS = 300


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:MESSAGE_CHARS] if lines else ""


def container_problem(status: dict[str, Any]) -> str:
    """One container's trouble, or "" when it is fine or merely starting."""
    state, last = status.get("state") or {}, status.get("lastState") or {}
    waiting, terminated = state.get("waiting"), state.get("terminated") or last.get("terminated")
    detail = _last_line((terminated or {}).get("message", "")) or (terminated or {}).get("reason", "")
    if waiting and waiting.get("reason") not in STARTING:
        cause = detail if waiting.get("reason") == "CrashLoopBackOff" and detail else waiting.get("message", "")
        return f"{waiting.get('reason', 'Waiting')}: {_last_line(cause)}".rstrip(": ")
    if terminated and not status.get("ready"):
        return f"exited with code {terminated.get('exitCode', '?')}: {detail}".rstrip(": ")
    return ""


def pod_problems(pods: list[dict[str, Any]], limit: int = 2) -> str:
    """The distinct problems of some pods, named by pod ("" when none reports one)."""
    seen: dict[str, str] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        for status in pod.get("status", {}).get("containerStatuses") or []:
            problem = container_problem(status)
            if problem and problem not in seen.values():
                seen[pod["metadata"]["name"]] = problem
    return "; ".join(f"pod {name}: {problem}" for name, problem in list(seen.items())[:limit])
