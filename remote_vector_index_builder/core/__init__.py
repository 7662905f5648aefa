"""The build library: no HTTP here. Entry point: :func:`workflow.run`."""
