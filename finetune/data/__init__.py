"""Training data: conversations and preference rows turned into token ids."""
