"""Post-training: SFT, LoRA/QLoRA, reward model, DPO family, PPO, GRPO."""
