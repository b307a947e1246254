from .loader import apply_overrides, dump_recipe, find_recipe, load_raw, load_recipe, recipe_dirs, validate
from .schema import DataConfig, Recipe

__all__ = ["apply_overrides", "dump_recipe", "find_recipe", "load_raw", "load_recipe", "recipe_dirs",
           "validate", "DataConfig", "Recipe"]
