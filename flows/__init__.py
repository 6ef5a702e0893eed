"""Prefect flows that orchestrate the DVC stages (pipeline, sweep, serve)."""
