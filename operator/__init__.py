"""Control plane: kopf operator, manifest builders, scaler, planner."""
