"""Model weights onto an engine's volume (the Kubernetes init container, `python -m gateway.weights`)."""
