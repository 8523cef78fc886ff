"""The YAML recipe: its schema and how a file becomes a validated Recipe."""

from finetune.recipe.load import RecipeError, dump_recipe, load_recipe
from finetune.recipe.schema import Recipe

__all__ = ["Recipe", "RecipeError", "dump_recipe", "load_recipe"]
