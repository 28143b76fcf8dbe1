"""prefloop.server.studies: measurements of the model's design (the RoPE study and its comparison models)."""
