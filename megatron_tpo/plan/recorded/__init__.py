"""A recorded run against the estimate: read its config and metrics, set each figure
beside its measurement, and fit the efficiency assumptions to it."""
