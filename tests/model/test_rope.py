"""RoPE pure functions against transformers' implementation (the independent oracle)."""
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prefloop.server.model.rope import apply_rope, precompute_cos_sin, rope_inv_freq


def test_apply_rope_matches_transformers():
    torch.manual_seed(0)
    n, heads, hd = 7, 3, 16
    x = torch.randn(n, heads, hd, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 5, 9, 100, 511])
    cos, sin = precompute_cos_sin(hd, 512, 10000.0, dtype=torch.float64)
    ours = apply_rope(x, cos[positions], sin[positions])
    # transformers wants [batch, heads, seq, hd] and cos/sin [batch, seq, hd]
    xt = x.permute(1, 0, 2).unsqueeze(0)
    ref, _ = apply_rotary_pos_emb(xt, xt, cos[positions].unsqueeze(0), sin[positions].unsqueeze(0))
    assert torch.allclose(ours, ref.squeeze(0).permute(1, 0, 2), atol=1e-12)


def test_rotation_is_norm_preserving_and_relative():
    torch.manual_seed(1)
    hd = 32
    cos, sin = precompute_cos_sin(hd, 4096, 10000.0, dtype=torch.float64)
    q, k = torch.randn(1, 1, hd, dtype=torch.float64), torch.randn(1, 1, hd, dtype=torch.float64)
    scores = []
    for offset in (0, 17, 1000, 3000):
        m, n = offset + 9, offset + 4
        qm = apply_rope(q, cos[[m]], sin[[m]])
        kn = apply_rope(k, cos[[n]], sin[[n]])
        scores.append(float((qm * kn).sum()))
        assert torch.allclose(qm.norm(), q.norm())
    assert max(scores) - min(scores) < 1e-9  # q_m . k_n depends only on m - n


def _hf_inv_freq(rope_parameters):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                      rope_parameters=rope_parameters)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu") if rope_parameters[
        "rope_type"] != "default" else (None, None)
    return inv_freq


def test_llama3_and_linear_scaling_match_transformers():
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    ours = rope_inv_freq(16, 500000.0, llama3).float()
    assert torch.allclose(ours, _hf_inv_freq(llama3).float(), rtol=1e-5)
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    ours = rope_inv_freq(16, 10000.0, linear).float()
    assert torch.allclose(ours, _hf_inv_freq(linear).float(), rtol=1e-5)
    # scaling really changes the frequencies (the test would catch a no-op)
    assert not torch.allclose(ours, rope_inv_freq(16, 10000.0).float())
