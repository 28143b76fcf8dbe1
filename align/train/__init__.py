"""prefloop.align.train: training a candidate — TRL's DPO/KTO and reward trainers, and our PPO loop."""
