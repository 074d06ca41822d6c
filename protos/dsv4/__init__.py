"""dsv4 API protos."""
