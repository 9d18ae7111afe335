"""Typed fields shared by the importers' schemas (pydantic): what a tool's file may hold, so that a
wrong type, a non-finite number or a value out of range is a named problem (`formats.problems_of`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

from training.data.formats import MAX_NAME_CHARS, MAX_POINTS


def _printable(name: str) -> str:
    if not name.strip() or not name.isprintable():
        raise ValueError("a category name must be printable characters (no newline or control character)")
    return name


Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # a JSON number (an integer is one too), finite
TextFinite = Annotated[float, Field(allow_inf_nan=False)]  # a number written as text (XML attributes)
NonNegative = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=0)]
Int = StrictInt
Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_printable)]
Point = Annotated[list[Finite], Field(min_length=2, max_length=2)]
Points = Annotated[list[Point], Field(max_length=MAX_POINTS)]
FlatPoints = Annotated[list[Finite], Field(max_length=2 * MAX_POINTS)]


class Record(BaseModel):
    """A tool's record: the fields read are typed, the others (tools add their own) are ignored."""

    model_config = ConfigDict(extra="ignore")
