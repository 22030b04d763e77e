"""The running operator's side of SLO-aware scaling: read the pods' Prometheus
metrics, turn two readings into an observed window, and let the StageScaler of
`sizing.scaling` decide each stage's replicas."""
