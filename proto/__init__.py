"""prefloop.proto: the prefloop.v1 .proto sources and their generated modules (never hand-edited)."""
