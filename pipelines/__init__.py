"""Kubeflow pipelines of FLAM (see README.md)."""
