"""Kubernetes manifests derived from the registry's hardware tags (`gateway deploy render`)."""

from gateway.deploy.render import DeployError, drift, render, write

__all__ = ["DeployError", "drift", "render", "write"]
