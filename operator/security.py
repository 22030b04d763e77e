"""Security contexts that pass Pod Security `restricted`: non-root, no
privilege escalation, every capability dropped, RuntimeDefault seccomp, and a
read-only root filesystem (writable paths are volumes)."""

from __future__ import annotations

EPD_UID = 10001  # the image's user (Dockerfile)
SECCOMP = {"type": "RuntimeDefault"}
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": SECCOMP}
CONTAINER_SECURITY = {"runAsNonRoot": True, "runAsUser": EPD_UID, "runAsGroup": EPD_UID,
                      "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": SECCOMP}
