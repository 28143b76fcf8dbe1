"""prefloop.server.ab: online A/B tests between two model versions — durable state in the registry
folder, and the always-valid decision rule on live head-to-head votes."""
