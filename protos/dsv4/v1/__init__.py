"""dsv4.v1 API: inference.proto and its generated stubs."""
