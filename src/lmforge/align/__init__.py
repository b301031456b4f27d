"""Post-training: SFT, LoRA/QLoRA adapters, reward models, preference optimisation, PPO, GRPO."""
