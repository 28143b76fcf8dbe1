"""benchmarks/quant_quality.py measures what it says: its teacher-forced logits are transformers'
forward pass on the same weights (the oracle), its KL is zero for the reference itself and
positive for a quantized copy, and its agreement count is the first differing position."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from prefloop.server.model.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quant_quality import all_logits, first_difference  # noqa: E402


def test_teacher_forced_logits_equal_transformers_forward(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", attention_bias=True)
    ids = list(range(3, 40))  # spans several 16-token blocks
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = all_logits(load_model(model_dir), ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4
    kl = F.kl_div(all_logits(load_model(model_dir, quantize="int8"), ids).log_softmax(-1),
                  ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert kl > 0  # quantized weights give another distribution


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([4], [5]) == 0
    assert first_difference([1, 2], [1, 2, 3]) == 2
