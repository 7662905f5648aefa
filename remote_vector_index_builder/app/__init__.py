"""The HTTP service around the core library."""
