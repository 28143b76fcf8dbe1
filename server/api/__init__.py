"""prefloop.server.api: the network front — gRPC server and servicers, error-to-status mapping, limits, auth."""
