"""What both APIs' request bodies share: strict parsing, text that is valid Unicode, and numbers in ranges
where sampling stays finite.

JSON lets a string carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode. Logits are
float32 (largest 3.4e38): a temperature T divides them and a repetition penalty p divides or multiplies
them, so both are kept within [1e-6, 1e6]. Even stacked (basilisk's two penalties, then T) they scale a
logit by at most 1e18, which leaves real logits (|x| < 1e4) far from overflowing.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

FACTOR_MIN, FACTOR_MAX = 1e-6, 1e6  # bounds of a temperature or penalty that scales logits
MAX_TOKEN_SPAN = 1 << 20  # token counts that cover history: more than any context this server runs
SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2**64)


class RequestModel(BaseModel):
    """A request body: JSON types are not coerced, and Infinity or NaN is no number."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def valid_unicode(value: Any) -> Any:
    """A string, or a list whose items are strings, refused if one holds a lone surrogate."""
    # a validated list holds one type: when its first item is no string, none is (list[int] can be long)
    texts = [value] if isinstance(value, str) else value if value and isinstance(value[0], str) else []
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError(
                "lone_surrogate", "a lone UTF-16 surrogate ({char}) at character {index} is not valid Unicode",
                {"char": f"\\u{ord(text[e.start]):04x}", "index": e.start},
            ) from None
    return value


def text_fields(*names: str) -> Any:
    """A validator, assigned in a model's body, checking that the named fields hold valid Unicode."""
    return field_validator(*names)(valid_unicode)


def zero_or_factor(value: float) -> float:
    if value != 0 and not FACTOR_MIN <= value <= FACTOR_MAX:
        raise PydanticCustomError(
            "factor_range", "must be 0 or within [{low}, {high}], got {value}",
            {"low": f"{FACTOR_MIN:g}", "high": f"{FACTOR_MAX:g}", "value": value},
        )
    return value


Factor = Annotated[float, Field(ge=FACTOR_MIN, le=FACTOR_MAX)]  # a repetition penalty
ZeroOrFactor = Annotated[float, Field(ge=0), AfterValidator(zero_or_factor)]  # a temperature (0: greedy)
TokenSpan = Annotated[int, Field(le=MAX_TOKEN_SPAN)]  # a number of history tokens
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
