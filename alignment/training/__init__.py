"""Training stages: SFT, reward model, DPO, PPO (and RLOO/GRPO through TRL)."""
