"""Dagster assets: thin recipes that call ``pipeline.*``, record metadata and run asset checks."""
