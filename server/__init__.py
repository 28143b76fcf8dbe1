"""prefloop.server: the serving side — model, engine, tokenizer, gRPC services, feedback log, CLI."""
