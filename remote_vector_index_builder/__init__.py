"""Remote vector index build service for OpenSearch k-NN."""

__version__ = "0.1.0"
