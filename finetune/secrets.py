"""Secrets stay in the environment: a recipe never holds one, and nothing the run writes may contain one.

Hub tokens and API keys are read by the libraries themselves from their environment variables (HF_TOKEN,
WANDB_API_KEY, ...), so a recipe has no key for them. The resolved recipe is written to the run folder, the
dashboards' configs and the model card, so a recipe value that looks like a token, or that equals the value
of a secret environment variable, is refused before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from finetune.errors import FinetuneError

# names of environment variables whose values are secrets: HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY...
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
NOT_SECRET_NAME = re.compile(r"_(PATH|FILE|DIR|HOME|URL|HOST|SOCK|TYPE|ID)$", re.IGNORECASE)
SHORTEST_SECRET = 8  # shorter values ("1", "true") are flags, and would match everywhere
TOKEN_SHAPES = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "a W&B API key": re.compile(  # not inside a path: hub snapshot folders are named by 40-hex commits
        r"(?<![0-9A-Za-z/\\])(local-)?[0-9a-f]{40}(?![0-9A-Za-z/\\])|\bwandb_v1_[A-Za-z0-9_]{20,}"),
    "an OpenAI/Anthropic-style API key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a GitHub token": re.compile(r"\b(ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}"),
    "an AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
}


class SecretInRecipe(FinetuneError):
    """A recipe value looks like a token or API key; it would be written to the run folder and the dashboards."""


def secret_env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{name: value} of the environment variables that hold secrets, by their names."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items()
            if SECRET_NAME.search(name) and not NOT_SECRET_NAME.search(name) and len(value) >= SHORTEST_SECRET}


def find_secrets(data: Any, environ: Mapping[str, str] | None = None, prefix: str = "") -> list[str]:
    """Every string in a nested recipe dict that looks like a secret, as 'dotted.key: why'."""
    if isinstance(data, Mapping):
        return [p for key, value in data.items() for p in find_secrets(value, environ, f"{prefix}{key}.")]
    if isinstance(data, list | tuple):
        return [p for i, value in enumerate(data) for p in find_secrets(value, environ, f"{prefix}{i}.")]
    if not isinstance(data, str):
        return []
    where = prefix.rstrip(".")
    found = [f"{where}: holds the value of ${name}" for name, value in secret_env_values(environ).items()
             if value in data]
    found += [f"{where}: looks like {shape}" for shape, pattern in TOKEN_SHAPES.items() if pattern.search(data)]
    return found[:1]


def refuse_secrets(recipe_dict: dict, source: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise SecretInRecipe naming every recipe key that holds something secret-looking."""
    problems = find_secrets(recipe_dict, environ)
    if problems:
        raise SecretInRecipe(
            f"{source}: {len(problems)} value(s) look like secrets and would be written to the run folder and the "
            "dashboards:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\n  Secrets belong in the environment only (HF_TOKEN for the hub, WANDB_API_KEY or `wandb login` for "
            "W&B); the libraries read them from there."
        )


def redact(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a nested dict/list/str with secret environment values and token-shaped strings masked."""
    if isinstance(data, Mapping):
        return {key: redact(value, environ) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [redact(value, environ) for value in data]
    if not isinstance(data, str):
        return data
    for name, value in secret_env_values(environ).items():
        data = data.replace(value, f"<${name}>")
    for pattern in TOKEN_SHAPES.values():
        data = pattern.sub("<redacted>", data)
    return data
