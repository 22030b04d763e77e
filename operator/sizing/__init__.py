"""SLO-aware sizing: performance model, discrete-event simulator, planner and
the per-stage scaling policy."""
