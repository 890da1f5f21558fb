"""Metric functions on arrays and tensors; they know no config and no method."""
