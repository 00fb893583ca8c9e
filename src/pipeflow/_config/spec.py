"""The shape of a config file (version 1), as pydantic models.

pydantic, because one validation pass reports every problem with its path (`loc`), which
maps back to a line and column of the YAML, and the same models give `pipeflow schema`
its JSON Schema for editors; `extra="forbid"` makes unknown keys errors. These models
check shape only; what needs imports (callables, pickling) is checked in `_config.py`.

Defaults are read from `Stage` and `Pool`, so the library and the config never disagree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    NonNegativeInt,
    PositiveInt,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from .._group import MAX_GROUP_SIZE, MAX_KEYS, Group
from .._rate import MAX_BURST, parse_rate
from .._stage import (
    MAX_BATCH,
    MAX_CONCURRENCY,
    MAX_QUEUE_SIZE,
    Kind,
    OnError,
    Op,
    Pool,
    PoolKind,
    Retry,
    Stage,
    StartMethod,
)

__all__ = [
    "BenchSpec",
    "ConfigSpec",
    "ExecutorSpec",
    "SinkSpec",
    "SourceSpec",
    "StageSpec",
    "parse_duration",
    "schema",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """`250ms`, `5s`, `1m` or a number of seconds, as float seconds.

    Raises:
        PydanticCustomError: The text is not a duration.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("duration", f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise PydanticCustomError(
            "duration", f"bad duration {value!r}: write 250ms, 5s, 1m or a number of seconds"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _default(cls: Any, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _path_shorthand(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


def _fn_shorthand(value: Any) -> Any:
    return {"fn": value} if isinstance(value, str) else value


def _empty_is_default(value: Any) -> Any:
    return {} if value is None else value


def _batch(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise PydanticCustomError("batch", f"expected auto or a positive int, got {value!r}")


def _workers(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():  # a quoted `${VAR}`, say
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    if isinstance(value, dict):
        unknown = sorted(str(key) for key in value if key not in ("min", "max"))
        if unknown:
            raise PydanticCustomError(
                "workers", f"unknown key {unknown[0]!r} in workers; write {{min: 1, max: 64}}"
            )
        for key in ("min", "max"):
            bound = value.get(key)
            if bound is not None and (
                not isinstance(bound, int) or isinstance(bound, bool) or bound < 1
            ):
                raise PydanticCustomError(
                    "workers", f"workers {key} must be a positive int, got {bound!r}"
                )
        return value
    raise PydanticCustomError(
        "workers", f"expected an int, auto or {{min: 1, max: 64}}, got {value!r}"
    )


def _retries_shorthand(value: Any) -> Any:
    return {"attempts": value} if isinstance(value, int) and not isinstance(value, bool) else value


def _group_shorthand(value: Any) -> Any:
    return {"size": value} if isinstance(value, int) and not isinstance(value, bool) else value


def _rate_shorthand(value: Any) -> Any:
    return value if value is None or isinstance(value, dict) else {"limit": value}


def _rate_limit(value: Any) -> Any:
    try:
        parse_rate(value)
    except ValueError as exc:
        raise PydanticCustomError("rate", str(exc)) from None
    return value


def _not_null(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("null", "give a value, or leave the key out")
    return value


@dataclasses.dataclass(frozen=True)
class _Forms:
    """A field's short forms, for pipeflow (expanded) and for editors (in the JSON Schema).

    Args:
        shorthands: The JSON Schemas of the short forms that `expand` turns into the long.
        expand: Turns a short form into the long one, and leaves the long one alone.
        null: Whether null is accepted. An option of `source:` or `sink:` defaults to None
            to mean "not chosen": a null there is refused, unless `expand` gives it a value.
    """

    shorthands: tuple[dict[str, Any], ...] = ()
    expand: Callable[[Any], Any] | None = None
    null: bool = True

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        if self.expand is not None:
            schema = core_schema.no_info_before_validator_function(self.expand, schema)
        if not self.null:
            schema = core_schema.no_info_before_validator_function(_not_null, schema)
        return schema

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        options = result["anyOf"] if list(result) == ["anyOf"] else [result]
        if not self.null:
            options = [option for option in options if option.get("type") != "null"]
        options = [*self.shorthands, *options]
        return options[0] if len(options) == 1 else {"anyOf": options}


_PATH = ({"type": "string", "description": "short for {path: ...}"},)
_FN = ({"type": "string", "description": "short for {fn: module:attribute}"},)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d*)?(ms|s|m)?$"},
            ],
            "description": "250ms, 5s, 1m, or a number of seconds",
        }
    ),
]
FnRef = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="module:attribute, e.g. pipelines.squares:square",
    ),
]
Workers = Annotated[
    Any,
    BeforeValidator(_workers),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY},
                {"const": "auto"},
                {
                    "type": "object",
                    "properties": {
                        "min": {"type": "integer", "minimum": 1},
                        "max": {"type": "integer", "minimum": 1},
                    },
                    "additionalProperties": False,
                    "description": "workers: auto within these bounds",
                },
            ],
            "default": 1,
            "description": "pool size, or concurrent tasks for async; auto tunes it as it runs",
        }
    ),
]
Batch = Annotated[
    Any,
    BeforeValidator(_batch),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "auto"},
                {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
            ],
            "default": "auto",
        }
    ),
]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Spec):
    """`retries:` of a stage (an int is short for `{attempts: N}`)."""

    attempts: PositiveInt = _default(Retry, "attempts")
    backoff: Duration = _default(Retry, "backoff")
    max_backoff: Duration = _default(Retry, "max_backoff")
    jitter: bool = _default(Retry, "jitter")
    retry_on: list[str] = Field(
        default=["Exception"],
        description="exception names: ValueError (a builtin) or module:Name",
    )


RATE_PATTERN = r"^\s*(\d+(\.\d*)?|\.\d+)\s*/\s*(\d+(\.\d*)?|\.\d+)?\s*(ms|s|m|min|h)\s*$"
RateLimit = Annotated[
    str,
    BeforeValidator(_rate_limit),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": RATE_PATTERN,
            "description": "calls/period: 10/s, 100/min, 5/250ms",
        }
    ),
]


class RateSpec(_Spec):
    """`rate:` of a stage (a text is short for `{limit: TEXT}`)."""

    limit: RateLimit
    burst: PositiveInt = Field(
        1, le=MAX_BURST, description="calls that may start at once after an idle spell"
    )


class GroupSpec(_Spec):
    """`group:` of a map_batch stage (an int is short for `{size: N}`)."""

    size: PositiveInt | None = Field(
        None, le=MAX_GROUP_SIZE, description="a group leaves when it holds this many items"
    )
    within: Duration | None = Field(
        None, description="a group leaves when its oldest item has waited this long"
    )
    by: FnRef | None = Field(None, description="module:attribute: item -> key; a group per key")
    max_keys: PositiveInt = Field(
        _default(Group, "max_keys"), le=MAX_KEYS, description="with by: the most open groups"
    )


class StageSpec(_Spec):
    """One entry of `stages:`."""

    name: str | None = Field(None, description="unique; defaults to the fn's name")
    fn: FnRef
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "not": {
                "properties": {"kind": {"type": "string"}, "executor": {"type": "string"}},
                "required": ["kind", "executor"],
            }
        },
    )

    kind: Kind | None = Field(None, description="default: async for an async def, else thread")
    executor: str | None = Field(None, description="a name from executors: (instead of kind)")
    workers: Workers = _default(Stage, "workers")
    op: Op = _default(Stage, "op")
    ordered: bool = _default(Stage, "ordered")
    batch: Batch = _default(Stage, "batch")
    queue_size: PositiveInt = Field(
        _default(Stage, "queue_size"), json_schema_extra={"maximum": MAX_QUEUE_SIZE}
    )
    timeout: Duration | None = _default(Stage, "timeout")
    retries: Annotated[
        RetrySpec | None,
        _Forms(
            ({"type": "integer", "minimum": 1, "description": "short for {attempts: N}"},),
            _retries_shorthand,
        ),
    ] = None
    on_error: OnError = _default(Stage, "on_error")
    setup: FnRef | None = None
    teardown: FnRef | None = None
    start_method: StartMethod | None = None
    rate: Annotated[
        RateSpec | None,
        _Forms(
            ({"type": "string", "pattern": RATE_PATTERN, "description": "short for {limit: ...}"},),
            _rate_shorthand,
        ),
    ] = None
    group: Annotated[
        GroupSpec | None,
        _Forms(
            ({"type": "integer", "minimum": 1, "description": "short for {size: N}"},),
            _group_shorthand,
        ),
    ] = None


class SecuritySpec(_Spec):
    """TLS to a Dask cluster: the arguments of `distributed.Security`."""

    tls_ca_file: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_scheduler_cert: str | None = None
    tls_scheduler_key: str | None = None
    tls_worker_cert: str | None = None
    tls_worker_key: str | None = None
    require_encryption: bool | None = None


class ExecutorSpec(_Spec):
    """One entry of `executors:`, a pool that stages share by name."""

    kind: PoolKind
    workers: PositiveInt = Field(
        _default(Pool, "workers"), json_schema_extra={"maximum": MAX_CONCURRENCY}
    )
    start_method: StartMethod | None = None
    max_tasks_per_child: PositiveInt | None = None
    address: str = Field(
        _default(Pool, "address"),
        description="dask: local (a cluster the run starts) or tcp://host:8786",
    )
    threads_per_worker: PositiveInt = _default(Pool, "threads_per_worker")
    dashboard: bool = Field(
        _default(Pool, "dashboard"), description="dask, address local: serve the dashboard"
    )
    security: SecuritySpec | bool | None = Field(
        None,
        description="dask: TLS certificate files, or true for temporary credentials "
        "(address: local)",
    )


def _not_zero(value: int) -> int:
    if value == 0:
        raise PydanticCustomError("not_zero", "step must not be 0")
    return value


class RangeSource(_Spec):
    start: int = 0
    stop: int
    step: Annotated[
        int, AfterValidator(_not_zero), WithJsonSchema({"type": "integer", "not": {"const": 0}})
    ] = 1


class PathSource(_Spec):
    path: str


class CsvSource(_Spec):
    path: str
    header: bool = True
    delimiter: str = Field(",", min_length=1, max_length=1)


class FnSource(_Spec):
    fn: FnRef
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


def _exactly_one(spec: BaseModel, what: str) -> None:
    given = sorted(spec.model_fields_set)
    if len(given) != 1:
        choices = ", ".join(type(spec).model_fields)
        got = f"got {', '.join(given)}" if given else "got none"
        raise PydanticCustomError("exactly_one", f"needs exactly one {what} of: {choices} ({got})")


# exactly one key: the validators below say so to pipeflow, these bounds to an editor
_ONE_KEY = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1, "maxProperties": 1})


class SourceSpec(_Spec):
    """`source:`, exactly one kind."""

    model_config = _ONE_KEY

    range: Annotated[RangeSource | None, _Forms(null=False)] = None
    items: Annotated[list[Any] | None, _Forms(null=False)] = None
    lines: Annotated[PathSource | None, _Forms(_PATH, _path_shorthand, null=False)] = None
    jsonl: Annotated[PathSource | None, _Forms(_PATH, _path_shorthand, null=False)] = None
    csv: Annotated[CsvSource | None, _Forms(_PATH, _path_shorthand, null=False)] = None
    fn: Annotated[FnSource | None, _Forms(_FN, _fn_shorthand, null=False)] = None

    @model_validator(mode="after")
    def _one(self) -> SourceSpec:
        _exactly_one(self, "source")
        return self


class StdoutSinkSpec(_Spec):
    format: Literal["json", "text"] = "json"


class JsonlSinkSpec(_Spec):
    path: str
    append: bool = False


class CsvSinkSpec(_Spec):
    path: str
    fields: list[str] | None = None


class NullSinkSpec(_Spec):
    pass


class FnSinkSpec(_Spec):
    fn: FnRef


class SinkSpec(_Spec):
    """`sink:` or `dead_letter:`, exactly one kind."""

    model_config = _ONE_KEY

    stdout: Annotated[StdoutSinkSpec | None, _Forms((), _empty_is_default)] = None
    jsonl: Annotated[JsonlSinkSpec | None, _Forms(_PATH, _path_shorthand, null=False)] = None
    csv: Annotated[CsvSinkSpec | None, _Forms(_PATH, _path_shorthand, null=False)] = None
    null: Annotated[NullSinkSpec | None, _Forms((), _empty_is_default)] = None
    fn: Annotated[FnSinkSpec | None, _Forms(_FN, _fn_shorthand, null=False)] = None

    @model_validator(mode="after")
    def _one(self) -> SinkSpec:
        _exactly_one(self, "sink")
        return self


class BenchSpec(_Spec):
    """`bench:`, what `pipeflow bench` runs when its command line gives no `--matrix`;
    `pipeflow run` ignores it."""

    matrix: dict[str, list[Any]] = Field(
        default={},
        description="config paths and the values to try: {stages.square.workers: [2, 4, 8]}",
    )
    repeat: PositiveInt = Field(3, description="timed runs per point")
    warmup: NonNegativeInt = Field(1, description="untimed runs per point, before the timed ones")


class ConfigSpec(_Spec):
    """A pipeflow config file, version 1."""

    model_config = ConfigDict(extra="forbid", title="pipeflow config")

    version: Literal[1] = 1
    name: str | None = Field(None, description="defaults to the file's name")
    executors: dict[str, ExecutorSpec] = {}
    source: SourceSpec
    stages: list[StageSpec] = Field(min_length=1)
    sink: SinkSpec
    dead_letter: SinkSpec | None = None
    max_errors: int | None = Field(None, ge=0)
    max_error_rate: float | None = Field(None, ge=0, le=1)
    bench: BenchSpec | None = None


# A scalar may be written as `${VAR}` or `${VAR:-default}` (see `_yaml`): an editor sees
# the text, pipeflow the value it stands for.
_VARIABLE = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "${VAR} or ${VAR:-default}, read from the environment",
}
# what describes a value rather than constrains it stays outside the alternatives
_ANNOTATIONS = ("title", "description", "default")


def _with_variables(node: Any) -> Any:
    """`node` where every number, bool, choice or patterned string may be a `${VAR}`."""
    if isinstance(node, list):
        return [_with_variables(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _with_variables(value) for key, value in node.items()}
    scalar = node.get("type") in ("integer", "number", "boolean") or "const" in node
    scalar |= "enum" in node or (node.get("type") == "string" and "pattern" in node)
    if not scalar:
        return node
    outer = {key: node.pop(key) for key in _ANNOTATIONS if key in node}
    return {"anyOf": [node, {"$ref": "#/$defs/Variable"}], **outer}


def schema() -> dict[str, Any]:
    """The JSON Schema of a config file, for editors that complete and check YAML.

    It accepts the configs pipeflow accepts, shorthands and `${VAR}` included, and
    refuses what pipeflow refuses for its shape; what needs imports or the environment
    (a missing fn, an unset variable, a duplicate stage name) is left to `pipeflow validate`.

    Returns:
        The schema as a dict (draft 2020-12).
    """
    result = _with_variables(ConfigSpec.model_json_schema())
    result["$defs"]["Variable"] = _VARIABLE
    # on_error: dead_letter needs a dead_letter: sink
    result["if"] = {
        "properties": {
            "stages": {
                "contains": {
                    "properties": {"on_error": {"const": "dead_letter"}},
                    "required": ["on_error"],
                }
            }
        },
        "required": ["stages"],
    }
    result["then"] = {
        "properties": {"dead_letter": {"$ref": "#/$defs/SinkSpec"}},
        "required": ["dead_letter"],
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **result}
