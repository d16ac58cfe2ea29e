"""The base of every config section: a pydantic v2 model that refuses unknown keys.

Sections are plain typed models (``pgasr.config``, ``pgasr.models.config``,
``pgasr.priors.config``); loading, overrides and error messages live in :mod:`pgasr.config`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Section"]


class Section(BaseModel):
    """A config section: unknown keys are errors, YAML scalars are coerced the lax way
    (``"5"`` -> 5, ``1e-3`` read by YAML as a string -> 0.001, ``yes`` -> True, a number for a
    string field -> its text), but ``true``/``false`` is never taken for a number. YAML 1.1
    reads ``off``/``on`` as booleans: a boolean given to a string field is that word
    (``stage2.residual_head: off``)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True,
                              protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _booleans(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if not isinstance(value, bool) or field is None:
                    continue
                if field.annotation in (int, float):
                    raise ValueError(f"{key}: expected a number, got {value!r}")
                if field.annotation is str:
                    data[key] = "on" if value else "off"
        return data
