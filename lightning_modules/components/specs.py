"""Option dataclasses (``*Spec``) from the plain mappings a config, a checkpoint or a Python caller gives."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

Spec = TypeVar("Spec")


def spec_from(value: Spec | dict, spec_class: type[Spec], key: str) -> Spec:
    """``value`` as a ``spec_class``; an unknown field or a value of another kind is an error naming ``key``."""
    if isinstance(value, spec_class):
        return value
    fields = [field.name for field in dataclasses.fields(spec_class)]
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping of {fields}, got {value!r}")
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{key} has unknown key(s) {unknown}; expected some of {fields}")
    return spec_class(**value)
