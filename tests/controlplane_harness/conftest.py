"""The control-plane fixtures (e2e/conftest.py) for the harness's own tests."""

from e2e.conftest import gpu_pools, k8s_cluster, namespace  # noqa: F401  (pytest finds fixtures by name)
