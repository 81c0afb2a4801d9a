"""OpenSDS for Kubernetes: the operator (scheduler, profile sync) and the dock (backend drivers)."""
