"""Every recipe shipped in recipes/, in every folder, validates against the current schema."""

from pathlib import Path

import pytest

from finetune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_found_recipes_in_subfolders():
    assert len(SHIPPED) >= 3
    assert any(p.parent.name == "mixtral-8x7b" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    load_recipe(path)
