"""prefloop.server.serving: the text-level front — backend protocol, Generator, backend factory, tokenizer, vLLM backend, hot-swap."""
