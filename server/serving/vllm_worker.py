"""PrefloopWorkerExtension: methods prefloop adds to every vLLM worker (`worker_extension_cls`).

vLLM mixes this class into its worker class, so `AsyncLLM.collective_rpc("<method name>")` runs a
method here on every worker (every tensor-parallel rank) without pickling code across processes.
Kept free of prefloop imports: it is imported inside vLLM's worker processes.
"""
from __future__ import annotations


class PrefloopWorkerExtension:
    def prefloop_retie_lm_head(self) -> bool:
        """After `reload_weights`: point a tied LM head at the *new* embedding again.

        The in-place reload gives the embedding a new tensor but restores the LM head's old one
        (nothing in the checkpoint names it), so without this a reloaded tied model would score
        tokens with the previous version's embedding. Returns whether the model is tied."""
        model = self.model_runner.get_model()
        if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
            return False
        head = model.lm_head.tie_weights(model.model.embed_tokens)
        head.quant_method.process_weights_after_loading(head)  # CPU: re-pack the GEMM weight
        return True
