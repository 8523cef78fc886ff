"""Answer a prompt in the Mixtral-Instruct format from an export folder or from a run (base + adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_for_generation(target: Path):
    """An export folder loads as is; a run folder loads its base with the last stage's adapter on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    run = json.loads((target / "run.json").read_text(encoding="utf-8")) if (target / "run.json").is_file() else None
    if run is None:
        raise FileNotFoundError(f"{target}: neither an export (config.json) nor a run folder (run.json)")
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(run["base_model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run["tokenizer"])
    return PeftModel.from_pretrained(base, run["final_adapter"]), tokenizer


def generate(target: Path, prompt: str, system: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, stream: bool = True) -> str:
    from transformers import TextStreamer

    from finetune.data.chat import tokenize_prompt

    model, tokenizer = load_for_generation(target)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    input_ids = torch.tensor([tokenize_prompt(messages, tokenizer)])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
