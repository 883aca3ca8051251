"""The one decoder of every JSON protocol message: msgspec Structs that declare each field's type and bounds.

A message is a subclass of `Message`. Its fields carry their bounds in the annotation (the aliases below, or
``Annotated[..., msgspec.Meta(...)]``): integer ranges that fit the database columns, string lengths and
patterns, list lengths, finite floats. `decode_json` / `convert` are the only ways received data becomes a
message; they refuse anything else with `ValidationError(reason, message)`:

* ``bad_json``: not JSON, not UTF-8, or not a JSON object; ``too_large``: over the size limit;
* ``missing_field`` / ``unexpected_field``: a required field is absent, an unknown one is present;
* ``bad_field``: a field has the wrong type or is out of its bounds, unless the message names a more
  specific code for errors in that field's value (``field_reasons``, e.g. ids -> ``bad_id``);
* whatever `Message.check` raises for rules across fields (e.g. label counts summing to the sample count).

Why msgspec: strict typed decoding in one pass (no bool for int, no str for int, no NaN), constraints declared
next to the field, unknown fields refused; a 0.7 MB wheel (aarch64 included) that adds ~2 MiB to a device's
memory, where pydantic would add ~10 MB and ~19 MiB. The REST API reuses the same types.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from shared.protocol.errors import ValidationError

INT32_MAX = 2**31 - 1  # an INTEGER column
INT64_MAX = 2**63 - 1  # a BIGINT column

Count = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]  # rounds, attempts, versions, sizes that fit INTEGER
Seed = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
UnixTime = Annotated[float, msgspec.Meta(ge=0, le=1e11)]  # seconds since 1970, finite


def text(limit: int) -> Any:
    """A string of at most `limit` characters, without NUL (PostgreSQL's text and JSONB refuse it: one such
    string would fail the whole transaction it is written in)."""
    return Annotated[str, msgspec.Meta(max_length=limit, pattern="^[^\x00]*\\Z")]


class Message(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every protocol message.

    ``field_reasons``: field name -> reason code for errors in that field's value (a wrong container type of
    the field itself stays ``bad_field``). ``check()``: rules across fields, raising ValidationError.
    """

    field_reasons: ClassVar[dict[str, str]] = {}

    def check(self) -> None:
        """Rules across fields; the default has none."""


M = TypeVar("M", bound=msgspec.Struct)
_PATH = re.compile(r"`(\$[^`]*)`")
_FIELD = re.compile(r"\$\.([A-Za-z_][A-Za-z0-9_]*)(.*)")


def decode_json(cls: type[M], data: bytes | bytearray | memoryview, what: str, max_bytes: int) -> M:
    """`data` (JSON bytes) as a `cls`, or ValidationError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValidationError("bad_json", f"{what} is not bytes")
    if len(data) > max_bytes:
        raise ValidationError("too_large", f"{what} of {len(data)} bytes exceeds {max_bytes}")
    try:
        message = msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise ValidationError(error_reason(cls, str(exc)), f"{what}: {describe(cls, str(exc))}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValidationError("bad_json", f"{what} is not valid JSON ({exc})") from None
    _check(message)
    return message


def convert(cls: type[M], obj: Any, what: str) -> M:
    """`obj` (plain Python data, e.g. a JSON column) as a `cls`, with the checks of `decode_json`."""
    try:
        message = msgspec.convert(obj, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise ValidationError(error_reason(cls, str(exc)), f"{what}: {describe(cls, str(exc))}") from None
    except RecursionError:
        raise ValidationError("bad_json", f"{what} is nested too deeply") from None
    _check(message)
    return message


def encode_json(message: msgspec.Struct) -> bytes:
    """Compact JSON of a message (fields in declaration order; floats that JSON cannot hold are refused)."""
    return msgspec.json.encode(message)


def to_builtins(message: msgspec.Struct) -> dict[str, Any]:
    """A message as plain JSON-compatible Python data (for a JSON column)."""
    return msgspec.to_builtins(message)


def _check(message: msgspec.Struct) -> None:
    check = getattr(message, "check", None)
    if check is not None:
        check()


def error_reason(cls: type, text_: str) -> str:
    """The reason code of a msgspec validation error message for a `cls`."""
    if text_.startswith("Object missing required field"):
        return "missing_field"
    if text_.startswith("Object contains unknown field"):
        return "unexpected_field"
    paths = _PATH.findall(text_)
    if not paths:
        return "bad_json"  # the document itself is not an object
    match = _FIELD.fullmatch(paths[-1])
    if match is None:
        return "bad_field"
    name, rest = match.groups()
    reason = getattr(cls, "field_reasons", {}).get(name)
    type_error_of_field_itself = not rest and ", got `" in text_ and "`key` in" not in text_
    return reason if reason and not type_error_of_field_itself else "bad_field"


# ------------------------------------------------------------------------------------------ readable messages
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "object": "an object", "array": "a list", "null": "null"}
_CONSTRAINT = re.compile(r"Expected `(\w+)` (?P<rest>.+?)(?: - at `.*)?$")
_GOT = re.compile(r"Expected `(?P<want>[\w |]+)`, got `(?P<got>\w+)`")


def describe(cls: type, text_: str) -> str:
    """A msgspec error message as one readable sentence that names the field: ``algorithm.local_steps must be
    >= 1``, ``rounds must be an integer, not a string``, ``unknown model 'resnet'; known: cnn, mlp``."""
    paths = _PATH.findall(text_)
    path = paths[-1][2:] if paths else ""
    missing = re.match(r"Object missing required field `(\w+)`", text_)
    if missing:
        return f"{_join(path, missing.group(1))} is required"
    unknown = re.match(r"Object contains unknown field `(\w+)`", text_)
    if unknown:
        scope = path.rsplit(".", 1)[-1] if path else "job"
        return f"{_join(path, unknown.group(1))}: unknown {scope} settings: {unknown.group(1)}"
    enum = re.match(r"Invalid enum value (.+?) - at", text_)
    if enum:
        if "`key` in" in text_:
            return f"{path}: unknown key {enum.group(1)}"
        name = path.rsplit(".", 1)[-1]
        known = _literal_values(cls, path)
        return f"{path}: unknown {name} {enum.group(1)}" + (f"; known: {', '.join(map(str, known))}" if known else "")
    got = _GOT.match(text_)
    if got:
        want = " or ".join(_TYPE_WORDS.get(w.strip(), w.strip()) for w in got.group("want").split("|"))
        return f"{path or 'the document'} must be {want}, not {_TYPE_WORDS.get(got.group('got'), got.group('got'))}"
    constraint = _CONSTRAINT.match(text_)
    if constraint:
        rest = constraint.group("rest")
        rest = re.sub(r"^of length (<=|>=) (\d+)", lambda m: f"of length {m.group(1)} {m.group(2)}", rest)
        if rest.startswith("matching regex"):
            rest = "in the right format: " + rest
        return f"{path or 'the document'} must be {rest}"
    if "out of range" in text_:
        return f"{path or 'a number'} is out of range"
    return text_


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _literal_values(cls: type, path: str) -> tuple[Any, ...]:
    """The allowed values of the Literal field at `path` ("algorithm.model") of struct `cls`, or ()."""
    try:
        info: Any = msgspec.inspect.type_info(cls)
        for name in path.split("."):
            info = _unwrap(info)
            info = next(f.type for f in info.fields if f.name == name)
        info = _unwrap(info)
        return tuple(info.values) if isinstance(info, msgspec.inspect.LiteralType) else ()
    except (StopIteration, AttributeError, TypeError):
        return ()


def _unwrap(info: Any) -> Any:
    """Through Optional[...] and Annotated metadata to the struct or literal type."""
    while True:
        if isinstance(info, msgspec.inspect.UnionType):
            inner = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(inner) != 1:
                return info
            info = inner[0]
        elif isinstance(info, msgspec.inspect.Metadata):
            info = info.type
        else:
            return info
