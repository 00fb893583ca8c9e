"""The config layer: YAML -> validated spec -> `Pipeline`.

yaml (positions) -> spec (pydantic shapes) -> imports (callables, pickling)
-> build (the library's objects); `config` drives them and locates problems.
"""

from .config import load, schema

__all__ = ["load", "schema"]
