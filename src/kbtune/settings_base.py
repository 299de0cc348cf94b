"""How kbtune declares a settings class: a frozen pydantic dataclass that refuses unknown keys, values
of the wrong type and non-finite numbers, so one validation pass lists every problem with its key."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

# strict: YAML and the command line give typed values; "3" is not an epoch count and `true` is not a
# batch size. allow_inf_nan=False: `1e400` parses as inf and would train into NaN.
SETTINGS_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def settings(cls: type[T]) -> type[T]:
    """Class decorator: a frozen, validated settings dataclass (still a stdlib dataclass for
    `dataclasses.fields/replace/asdict`)."""
    decorated: Any = _pydantic_dataclass(frozen=True, config=SETTINGS_CONFIG)(cls)
    return decorated
