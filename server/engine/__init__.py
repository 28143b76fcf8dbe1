"""prefloop.server.engine: the native engine on token ids — sequences, blocks, scheduler, KV cache, context policy, model runner, sampler."""
