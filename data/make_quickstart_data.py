"""Writes the quickstart's data: a small chat set for SFT and a preference set for DPO.

The tasks are templated facts (capitals, opposites, counting, spelling in capitals), so a tiny model
learns the answer format within a few dozen steps and its loss visibly falls; the preference set pairs
each correct, concise answer with a wrong fact or an unhelpful refusal, which DPO learns to rank.

    python data/make_quickstart_data.py        # rewrites data/quickstart/*.jsonl (seeded, reproducible)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Austria": "Vienna", "Ireland": "Dublin",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ghana": "Accra", "Hungary": "Budapest", "Denmark": "Copenhagen",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "light": "dark", "happy": "sad", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "high": "low", "old": "young", "rich": "poor",
    "wet": "dry", "loud": "quiet", "hard": "soft", "first": "last", "up": "down", "inside": "outside",
}
WORDS = ["apple", "river", "garden", "window", "rocket", "yellow", "silver", "market", "planet", "winter",
         "coffee", "bridge", "forest", "pencil", "dragon", "castle", "summer", "orange", "violin", "camera"]
SYSTEM_PROMPTS = ["You are a concise assistant.", "Answer in one short sentence.", "Be brief and accurate."]
REFUSALS = ["I don't know.", "I cannot help with that.", "That is not something I can answer.", "Ask someone else."]


def capital_task(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(list(CAPITALS))
    wrong = rng.choice([c for k, c in CAPITALS.items() if k != country])
    question = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."])
    return question.format(country), f"The capital of {country} is {CAPITALS[country]}.", f"The capital of {country} is {wrong}."


def opposite_task(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(list(OPPOSITES))
    wrong = rng.choice([o for w, o in OPPOSITES.items() if w != word])
    question = rng.choice(["What is the opposite of {}?", "Give the opposite of the word '{}'."])
    return question.format(word), f"The opposite of {word} is {OPPOSITES[word]}.", f"The opposite of {word} is {wrong}."


def count_task(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randint(1, 20)
    stop = start + rng.randint(2, 6)
    right = ", ".join(str(n) for n in range(start, stop + 1))
    wrong = ", ".join(str(n) for n in range(start, stop + 1, 2))
    return f"Count from {start} to {stop}.", right, wrong


def spell_task(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Write the word '{word}' in capital letters.", word.upper(), word[::-1].upper()


TASKS = [capital_task, opposite_task, count_task, spell_task]


def prompt_messages(rng: random.Random, question: str) -> list[dict]:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": question})
    return messages


def sft_row(rng: random.Random) -> dict:
    question, answer, _ = rng.choice(TASKS)(rng)
    messages = prompt_messages(rng, question) + [{"role": "assistant", "content": answer}]
    if rng.random() < 0.25:  # some multi-turn conversations
        question2, answer2, _ = rng.choice(TASKS)(rng)
        messages += [{"role": "user", "content": question2}, {"role": "assistant", "content": answer2}]
    return {"messages": messages}


def preference_row(rng: random.Random) -> dict:
    question, answer, wrong = rng.choice(TASKS)(rng)
    rejected = wrong if rng.random() < 0.5 else rng.choice(REFUSALS)
    return {
        "prompt": prompt_messages(rng, question),
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    rng = random.Random(1234)
    out = Path(__file__).parent / "quickstart"
    write_jsonl(out / "sft.jsonl", [sft_row(rng) for _ in range(480)])
    write_jsonl(out / "preference.jsonl", [preference_row(rng) for _ in range(320)])
    print(f"wrote {out}/sft.jsonl and {out}/preference.jsonl")


if __name__ == "__main__":
    main()
