"""Answer in the Mixtral-Instruct format, streaming tokens, from an export folder or a run (base + adapter)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.errors import FinetuneError


def load_for_generation(target: Path):
    """An export folder loads as is; a run folder loads its base with the last stage's adapter on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        if not (target / "tokenizer_config.json").is_file():  # a base checkpoint, say: an export holds both
            raise FinetuneError(f"{target}: has config.json but no tokenizer (tokenizer_config.json); give an "
                                "export folder, which holds both, or a run folder")
        with _loading(target):
            return AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    if not (target / "run.json").is_file():
        hint = ("; this is an adapter-only export: give the run folder or a merged export" if
                (target / "adapter_config.json").is_file() else "")
        raise FinetuneError(f"{target}: neither an export (config.json) nor a finished run folder (run.json){hint}")
    from peft import PeftModel

    from finetune.export import run_record

    run = run_record(target)
    with _loading(target):
        base = AutoModelForCausalLM.from_pretrained(run["base_model"], dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(run["tokenizer"])
        return PeftModel.from_pretrained(base, run["final_adapter"]), tokenizer


@contextmanager
def _loading(target: Path):
    """A damaged folder (a missing or cut-short weights file, a broken config) is the user's to fix: one line
    naming the folder, with the loader's own first line."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"{target}: cannot load the model for generation: {first}") from e


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, stream: bool) -> str:
    """The assistant's next turn, printed token by token as it is produced when `stream` is set."""
    from transformers import TextStreamer

    from finetune.data.chat import tokenize_prompt

    input_ids = torch.tensor([tokenize_prompt(messages, tokenizer)])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def generate(target: Path, prompt: str, system: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, stream: bool = True) -> str:
    model, tokenizer = load_for_generation(target)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return reply(model, tokenizer, messages, max_new_tokens, temperature, stream)


def chat(target: Path, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """A conversation on the terminal: the whole history goes into each turn's prompt."""
    model, tokenizer = load_for_generation(target)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("chat: /reset clears the conversation, /exit or end of input leaves", flush=True)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print(flush=True)  # end of input (Ctrl-D): the shell's prompt starts on its own line
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, max_new_tokens,
                                                              temperature, stream=True)})
