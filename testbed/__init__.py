"""What the tests and the benchmarks share: seeded data sets and blobs (``data``), the S3 fault
proxy (``faultproxy``) and the multi-process fleet harness (``fleet_harness``: redis-server,
replicas in their own processes). Not installed with the service."""
