"""Fine-tune Mixtral-style sparse Mixture-of-Experts models: QLoRA SFT, DPO, merge and export."""
