"""Training stages: each a module with one entry point (run_sft, run_dpo)."""
