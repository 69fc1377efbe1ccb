"""Small pydantic helpers shared by every config schema.

`Fraction` accepts numbers or strings such as "8/255" (how the papers write
budgets), so params.yaml can stay close to the papers' notation.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _parse_fraction(value):
    if isinstance(value, str):
        text = value.strip()
        if "/" in text:
            num, den = text.split("/", 1)
            try:
                return float(num) / float(den)
            except (ValueError, ZeroDivisionError) as err:
                raise ValueError(f"'{value}' is not a number or a fraction like '8/255'") from err
        try:
            return float(text)
        except ValueError as err:
            raise ValueError(f"'{value}' is not a number or a fraction like '8/255'") from err
    return value


Fraction = Annotated[float, BeforeValidator(_parse_fraction)]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
