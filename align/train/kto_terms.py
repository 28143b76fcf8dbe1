"""Extra per-answer terms on KTO's loss, read from the policy pass TRL already runs.

`kto_with_terms(base, terms)` subclasses a `KTOTrainer` (TRL's, or align/train/kto_reference.py's)
so that its training loss is KTO's plus, for each `(name, coef, term)` in `terms`, `coef` × the
batch mean of `term(log_probs, inputs)` — one value per answer, computed from the per-token
log-probabilities of TRL's own policy forward pass (captured by a forward hook, so a step costs
no extra pass). `log_probs[:, j]` is the log-probability of token j + 1 of `inputs["input_ids"]`
(TRL's shifted labels). Each term is logged under `name` in the trainer's history, averaged over
ranks. The terms: the loops of disliked answers (align/train/unlikelihood.py) and the likelihood
of liked answers (align/train/liked_nll.py).
"""
from __future__ import annotations

from typing import Callable


def kto_with_terms(base: type, terms: list[tuple[str, float, Callable]]) -> type:
    """`base` (a `trl.KTOTrainer` class) with `terms` added to its training loss."""
    import torch

    class KTOWithTerms(base):
        extra_terms = list(terms)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            captured = []

            def policy_pass(_module, _args, output):
                log_probs = getattr(output, "log_probs", None)
                if log_probs is not None and log_probs.requires_grad and not captured:
                    captured.append(log_probs)  # the reference pass runs without gradients
            hook = self.accelerator.unwrap_model(model).register_forward_hook(policy_pass)
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                hook.remove()
            if not model.training or not torch.is_grad_enabled():
                return result
            if not captured:
                names = ", ".join(name for name, _, _ in self.extra_terms)
                raise RuntimeError(f"{names}: the policy's forward pass gave no per-token "
                                   "log-probabilities (has TRL's KTO forward changed?)")
            width = inputs["input_ids"].shape[1] - 1
            log_probs = captured[0][:, -width:]
            extra = 0.0
            for name, coef, term in self.extra_terms:
                value = term(log_probs, inputs).mean()
                logged = self.accelerator.gather_for_metrics(value.detach()).mean()
                self._metrics["train"][name].append(float(logged))
                extra = extra + coef * value
            if return_outputs:
                loss, outputs = result
                return loss + extra, outputs
            return result + extra

    return KTOWithTerms
