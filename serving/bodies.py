"""JSON request bodies parsed without holding the GIL for their large strings.

A V1 body of one large image is a few dozen bytes of JSON around one base64 string of tens of megabytes.
A JSON parser (orjson, pydantic's jiter) holds the GIL while it copies and checks that string: 25 ms for
26 MB, during which the event loop, and so the liveness probe, waits. `lift` finds each long string
(`LIFT_AT` characters or more, no escapes) with `bytes.find` (memchr, ~1 ms for 26 MB), and replaces it in
the body by a short placeholder; the parser then reads a body of a few hundred bytes, and `restore` puts
each string back as a `LargeText`: a view of the body's bytes, never copied, which
`serving.predictor.b64decode` decodes with the GIL released (pybase64).

Leniency, by design: a lifted string is not checked for control characters or UTF-8 by the parser. It is
checked where it is used (base64's alphabet, strictly); a lifted string in a field the predictor ignores
is ignored, as any other. Parse errors name positions in the body without its long strings.
"""

from __future__ import annotations

import secrets
from typing import Any

LIFT_AT = 1 << 16  # characters: shorter strings are parsed as usual
MAX_STRINGS = 4096  # a body with more strings than this is parsed as a whole (the scan is Python)


class LargeText:
    """A JSON string of a request body, as the bytes between its quotes (no escapes in them)."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def startswith(self, prefix: str) -> bool:
        return bytes(self.view[:len(prefix)]) == prefix.encode()

    def __repr__(self) -> str:
        return f"LargeText({len(self.view)} characters)"


def lift(body: bytes, at: int = LIFT_AT) -> tuple[bytes, dict[str, LargeText]]:
    """`body` with each string of `at` characters or more (and no backslash) replaced by a placeholder,
    and the lifted strings by placeholder. Outside strings, a JSON text has no quote, so the scan's idea
    of where strings are is the parser's; a body that is not JSON is left to the parser to refuse."""
    if len(body) < at:
        return body, {}
    nonce = secrets.token_hex(8)
    view = memoryview(body)
    pieces: list[bytes] = []
    lifted: dict[str, LargeText] = {}
    kept = pos = scanned = 0  # kept: the body up to here is in pieces; pos: where the scan goes on
    while (start := body.find(b'"', pos)) >= 0:
        scanned += 1
        if scanned > MAX_STRINGS:
            return body, {}
        i, escaped = start + 1, False
        while True:
            end = body.find(b'"', i)
            if end < 0:
                return (b"".join(pieces) + body[kept:], lifted) if lifted else (body, {})
            backslash = body.find(b"\\", i, end)
            if backslash < 0:
                break
            escaped, i = True, backslash + 2  # an escape: the quote it may hide is not the end
        if not escaped and end - start - 1 >= at and not body[end + 1:end + 65].lstrip().startswith(b":"):  # a value, not a key
            key = f"\x00lifted:{nonce}:{len(lifted)}"
            lifted[key] = LargeText(view[start + 1:end])
            pieces += [body[kept:start], b'"\\u0000lifted:', nonce.encode(), b":", str(len(lifted) - 1).encode(), b'"']
            kept = end + 1
        pos = end + 1
    if not lifted:
        return body, {}
    return b"".join(pieces) + body[kept:], lifted


def restore(value: Any, lifted: dict[str, LargeText]) -> Any:
    """`value` (parsed from `lift`'s body: a dict, list or string) with its placeholders replaced by the
    lifted strings, in place."""
    if not lifted:
        return value
    if isinstance(value, str):
        return lifted.get(value, value)
    if not isinstance(value, (dict, list)):
        return value
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in list(items):
            if isinstance(item, str):
                if item in lifted:
                    node[key] = lifted[item]
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return value


def restore_v2(request: Any, lifted: dict[str, LargeText]) -> Any:
    """An Open Inference Protocol request (kserve's pydantic `InferenceRequest`, validated from `lift`'s
    body) with the lifted strings back where a V2 request may hold strings: its id, its and its inputs'
    and outputs' parameters, and its inputs' data."""
    if not lifted:
        return request
    request.id = restore(request.id, lifted)
    restore(request.parameters or {}, lifted)
    for tensor in [*request.inputs, *(request.outputs or [])]:
        restore(tensor.parameters or {}, lifted)
        if isinstance(getattr(tensor, "data", None), list):
            restore(tensor.data, lifted)
    return request
