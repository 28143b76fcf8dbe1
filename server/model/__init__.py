"""prefloop.server.model: the Llama-family decoder — config, RoPE, paged attention, weight loading, int8, packed weights, C++ kernels."""
