"""prefloop.align: offline retraining on the preference log (DPO/KTO/RM/PPO), eval gate, registry publishing."""
