"""KTO's reference point from the KL stop's probe, instead of two more forward passes a step.

KTO (Ethayarajh et al. 2024, eq. 7) compares each answer's log-ratio to a reference point z0, an
estimate of KL(policy ‖ reference) that no gradient flows through. TRL estimates it at every step
from the batch's answers paired with other prompts: one forward pass of the policy and one of the
reference over a second copy of the batch — a third of a training step's compute on a CPU. The KL
stop (align/train/kl_stop.py) already measures the exact KL per answer token to the same
reference every few steps, on training answers. `probe_reference_kto` makes a `KTOTrainer` whose
z0 is that: the latest check's KL per token times each mismatched answer's length (0 before the
first check, when the policy still is its reference), so a step runs one forward and backward
pass of the policy and one reference pass. It is used whenever the KL stop runs; `--stop-kl 0`
(or sharded training, where the probe does not run) keeps TRL's own estimate.
"""
from __future__ import annotations

from typing import Any


def _adapters_off(model) -> bool:
    """Whether `model`'s LoRA layers are switched off (TRL runs the reference that way)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is not None and bool(layer.disable_adapters)


def probe_reference_kto(kl_stop) -> type:
    """A `trl.KTOTrainer` subclass whose reference point is `kl_stop`'s latest KL per token
    (module docstring). Set `trainer.kl_source = None` to fall back to TRL's estimate."""
    import torch
    from trl import KTOTrainer

    class ProbeReferenceKTO(KTOTrainer):
        kl_source: Any = kl_stop

        def _compute_kl_logps(self, model, batch):
            if self.kl_source is None:
                return super()._compute_kl_logps(model, batch)
            # TRL takes z0 = mean(policy's − reference's log-probs of the mismatched answers):
            # the policy's call gets KL per token × length, the reference's call zeros
            lengths = batch["KL_completion_mask"].sum(-1).to(torch.float32)
            if (self.ref_model is not None and model is self.ref_model) or _adapters_off(model):
                return torch.zeros_like(lengths)
            return lengths * float(self.kl_source.latest_kl)

    return ProbeReferenceKTO
