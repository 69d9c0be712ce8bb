"""Metrics: the host and every VM sampled into fixed-size round-robin stores,
served as chart series (`/api/.../metrics`) and in Prometheus format (`/metrics`)."""
