"""Parse-time checks of gin configs: value types and missing required values.

gin checks that a binding names a known configurable and parameter, but not that its value has a
type the parameter can take: `train.offline_steps = '1e6'` or `rlpd.hidden_dims = (256)` (an int,
not a tuple) would only fail deep inside training, or not at all. Two checks close that gap:

- `checking_types()`: a context in which every binding gin makes is checked against the
  parameter's annotation (function signature, or the class's `__init__`/dataclass fields for
  classes and equinox modules). A mismatch raises `GinTypeError` from inside gin's binding step,
  so gin appends the file, line and text of the binding (`In file "x.gin", line 3`) exactly as it
  does for its own errors. `flowrl.cli.parse_gin` parses every file and `--bind` inside it.
- `check_required(selector, provided)`: after parsing, every parameter reachable from the root
  configurable (and from the `@name()` references bound to it, recursively, through macros) whose
  value is `gin.REQUIRED` (default or `%gin.REQUIRED`) or that has no default at all, and every
  macro used but never defined, is reported, all in one `ConfigError` line.

Type rules (a value gin parsed, against an annotation): `bool` only for `bool`; `int` (not bool)
for `int`; `int`/`float` for `float`; `str` for `str`/`PathLike`; tuples for `tuple[...]` (a list
is refused: static fields must be hashable) with each element checked; jaxtyping/`jax.Array`
annotations take numbers (their fields convert with `jnp.asarray`); `None` only for optional
parameters; a class annotation (e.g. `AbstractExtractor`) takes a `@name()` reference whose
configurable is a subclass of it. Macros, constants, callables and annotations this module cannot
interpret are accepted unchecked (no false alarms). Fields with a converter are checked only when
annotated as arrays (the converter may accept other types).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import inspect
import numbers
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import gin
import gin.config as gin_config
import numpy as np

from flowrl.errors import ConfigError

__all__ = ["GinTypeError", "check_binding", "check_required", "checking_types"]

_UNKNOWN = object()  # an annotation this module cannot interpret: accept anything


class GinTypeError(ConfigError, TypeError):
    """A gin binding whose value does not have the parameter's type.

    Also a `TypeError`, so gin appends the binding's file and line to the message.
    """


# --------------------------------------------------------------------------------------------
# Annotations of a configurable's parameters


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    """Evaluate a string annotation (`from __future__ import annotations`) in its module, as
    `typing.get_type_hints` does, but one at a time: an unresolvable one becomes `_UNKNOWN`
    (accept anything) instead of hiding the others."""
    if isinstance(annotation, str):
        try:
            return eval(annotation, namespace)  # noqa: S307 - the module's own annotation text
        except Exception:
            return _UNKNOWN
    return annotation


def _generated_init(cls: type) -> bool:
    """Whether `cls.__init__` is the one dataclasses/equinox generate from the fields."""
    code = getattr(cls.__init__, "__code__", None)
    return dataclasses.is_dataclass(cls) and (code is None or code.co_filename == "<string>")


def _parameter_annotations(wrapped: Any) -> dict[str, tuple[Any, bool]]:
    """{parameter: (resolved annotation or _UNKNOWN, has a converter)} of a function or class.

    Classes whose `__init__` is generated from their fields (dataclasses, equinox modules) take
    the field annotations (over the MRO, each resolved in its own module); other classes and
    functions take their `__init__`'s / own annotations.
    """
    try:
        signature = inspect.signature(wrapped)
    except (TypeError, ValueError):
        return {}
    hints: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    if inspect.isclass(wrapped) and _generated_init(wrapped):
        fields = getattr(wrapped, "__dataclass_fields__", {})
        for klass in reversed(wrapped.__mro__):
            owner = inspect.getmodule(klass)
            namespace = dict(vars(owner)) if owner is not None else {}
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                hints[name] = _resolve(annotation, namespace)
    else:
        function = wrapped.__init__ if inspect.isclass(wrapped) else wrapped
        namespace = getattr(function, "__globals__", {})
        for name, annotation in getattr(function, "__annotations__", {}).items():
            hints[name] = _resolve(annotation, namespace)
    result = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        field = fields.get(name)
        converter = field is not None and field.metadata.get("converter") is not None
        result[name] = (hints.get(name, _UNKNOWN), converter)
    return result


# --------------------------------------------------------------------------------------------
# Type compatibility


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        if _is_array_type(annotation):
            return "a number or array"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _is_array_type(annotation: Any) -> bool:
    try:
        from jaxtyping import AbstractArray

        if isinstance(annotation, type) and issubclass(annotation, AbstractArray):
            return True
    except ImportError:  # pragma: no cover - jaxtyping is a dependency
        pass
    import jax

    return annotation in (jax.Array, np.ndarray)


def _value_text(value: Any) -> str:
    if isinstance(value, gin_config.ConfigurableReference):
        return f"@{value.scoped_selector}{'()' if value.evaluate else ''}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reference_result(reference: gin_config.ConfigurableReference) -> Any:
    """The class a `@name()` reference produces (_UNKNOWN for functions without a return type)."""
    wrapped = reference.configurable.wrapped
    if inspect.isclass(wrapped):
        return wrapped
    annotation = getattr(wrapped, "__annotations__", {}).get("return", _UNKNOWN)
    return _resolve(annotation, getattr(wrapped, "__globals__", {}))


def _is_gin_special(value: Any) -> bool:
    """Macros (`%X`) and constants (`%gin.REQUIRED`, ...): resolved later, not checked here."""
    return isinstance(value, gin_config.ConfigurableReference) and value.configurable.name in ("macro", "constant")


def _mismatch(value: Any, annotation: Any, converter: bool = False) -> str | None:
    """Why `value` cannot be passed for `annotation` (None: it can, or we cannot tell)."""
    if annotation is _UNKNOWN or annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if value is gin.REQUIRED or _is_gin_special(value):
        return None
    if isinstance(annotation, typing.TypeVar) or annotation is object:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        reasons = [_mismatch(value, member, converter) for member in args]
        if any(reason is None for reason in reasons):
            return None
        return f"expected {_describe(annotation)}, got {_kind(value)}"
    if origin is typing.Literal:
        return None if value in args else f"expected one of {list(args)}, got {_value_text(value)}"
    if origin is typing.Annotated:
        return _mismatch(value, args[0], converter)
    if annotation is type(None) or annotation is None:
        return None if value is None else f"expected None, got {_kind(value)}"

    if isinstance(value, gin_config.ConfigurableReference):
        return _reference_mismatch(value, annotation, origin)
    if value is None:
        return f"expected {_describe(annotation)}, got None"
    if _is_array_type(annotation):
        return _array_mismatch(value, annotation)
    if converter:
        return None  # e.g. `converter=tuple`: we cannot know what it accepts
    if annotation is bool:
        return None if isinstance(value, (bool, np.bool_)) else f"expected bool (True/False), got {_kind(value)}"
    if annotation is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        return None if ok else f"expected int, got {_kind(value)}"
    if annotation is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        return None if ok else f"expected float, got {_kind(value)}"
    if annotation is complex:
        ok = isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_))
        return None if ok else f"expected a number, got {_kind(value)}"
    if annotation is str:
        return None if isinstance(value, str) else f"expected str (quoted), got {_kind(value)}"
    if annotation in (os.PathLike,) or origin is os.PathLike:
        return None if isinstance(value, (str, os.PathLike)) else f"expected a path, got {_kind(value)}"

    container = origin or annotation
    if container is tuple:
        if not isinstance(value, tuple):
            hint = " (write a tuple, e.g. (256, 256) or (256,) for one element)"
            return f"expected {_describe(annotation)}{hint}, got {_kind(value)}"
        return _items_mismatch(value, args, homogeneous=len(args) == 2 and args[1] is Ellipsis, tuple_args=True)
    if container in (list, collections.abc.Sequence, collections.abc.MutableSequence):
        if not isinstance(value, (list, tuple)) or (container is list and not isinstance(value, list)):
            return f"expected {_describe(annotation)}, got {_kind(value)}"
        return _items_mismatch(value, args[:1] * len(value) if args else (), homogeneous=False, tuple_args=False)
    if container in (dict, collections.abc.Mapping, Mapping):
        if not isinstance(value, dict):
            return f"expected {_describe(annotation)}, got {_kind(value)}"
        if len(args) == 2:
            for key, item in value.items():
                reason = _mismatch(key, args[0]) or _mismatch(item, args[1])
                if reason:
                    return f"entry {key!r}: {reason}"
        return None
    if container in (collections.abc.Callable, typing.Callable) or annotation is type or origin is type:
        return None  # only references can be callables in gin; their result type is unknown
    if isinstance(annotation, type):
        # A class such as AbstractExtractor or AgentConfig: a gin literal is never an instance.
        if isinstance(value, annotation):
            return None
        return f"expected {_describe(annotation)} (a reference such as @name()), got {_kind(value)}"
    return None


def _items_mismatch(value: tuple | list, args: tuple, *, homogeneous: bool, tuple_args: bool) -> str | None:
    if not args:
        return None
    if homogeneous:
        element_types = (args[0],) * len(value)
    elif tuple_args:
        if args == ((),):  # tuple[()]
            element_types = ()
        else:
            element_types = args
        if len(element_types) != len(value):
            return f"expected {len(element_types)} elements, got {len(value)}: {_value_text(value)}"
    else:
        element_types = args
    for index, (item, element_type) in enumerate(zip(value, element_types)):
        reason = _mismatch(item, element_type)
        if reason:
            return f"element {index} of {_value_text(value)}: {reason}"
    return None


def _reference_mismatch(reference: gin_config.ConfigurableReference, annotation: Any, origin: Any) -> str | None:
    if not reference.evaluate:
        callable_like = origin in (collections.abc.Callable, type) or annotation in (
            collections.abc.Callable, typing.Callable, type)
        if callable_like or not isinstance(annotation, type):
            return None
        return (f"expected {_describe(annotation)}, got the configurable itself {_value_text(reference)}; "
                f"call it: {_value_text(reference)}()")
    result = _reference_result(reference)
    if result is _UNKNOWN or not isinstance(result, type):
        return None
    if isinstance(annotation, type) and not _is_array_type(annotation) and not typing.get_args(annotation):
        if issubclass(result, annotation):
            return None
        return f"expected {_describe(annotation)}, got {_value_text(reference)}, which builds a {result.__name__}"
    return None


def _array_mismatch(value: Any, annotation: Any) -> str | None:
    if isinstance(value, (str, bytes, dict)):
        return f"expected a number or array, got {_kind(value)}"
    try:
        array = np.asarray(value)
    except Exception:
        return f"expected a number or array, got {_kind(value)}"
    if array.dtype.kind not in "biuf":
        return f"expected a number or array, got {_kind(value)}"
    dim_str = getattr(annotation, "dim_str", None)
    if dim_str == "" and array.ndim != 0:
        return f"expected a scalar, got {_kind(value)}"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, gin_config.ConfigurableReference):
        return _value_text(value)
    return f"{type(value).__name__} {_value_text(value)}"


# --------------------------------------------------------------------------------------------
# Binding-time check


def _short_selector(selector: str) -> str:
    try:
        return gin_config._REGISTRY.minimal_selector(selector)
    except Exception:
        return selector


def check_binding(binding_key: Any, value: Any) -> None:
    """Raise `GinTypeError` if `value` cannot be passed for the parameter `binding_key` names.

    `binding_key` is what `gin.bind_parameter` takes ('scope/name.param' or a tuple).
    """
    key = gin_config.ParsedBindingKey.parse(binding_key)
    if key.complete_selector in ("gin.macro", "gin.constant"):
        return
    configurable = gin_config._REGISTRY.get_match(key.complete_selector)
    if configurable is None:
        return
    annotations = _parameter_annotations(configurable.wrapped)
    if key.arg_name not in annotations:
        return
    annotation, converter = annotations[key.arg_name]
    reason = _mismatch(value, annotation, converter)
    if reason is not None:
        name = f"{_short_selector(configurable.selector)}.{key.arg_name}"
        raise GinTypeError(f"{name} = {_value_text(value)} has the wrong type: {reason}")


@contextlib.contextmanager
def checking_types() -> Iterator[None]:
    """Within this context, every binding gin parses is type-checked as it is bound.

    The check runs inside gin's own binding step (`gin.config.bind_parameter`, called by
    `parse_config` under `try_with_location`), so its error carries the binding's file and line.
    """
    real_bind = gin_config.bind_parameter

    def checked_bind(binding_key, value):
        real_bind(binding_key, value)
        check_binding(binding_key, value)

    gin_config.bind_parameter = checked_bind
    try:
        yield
    finally:
        gin_config.bind_parameter = real_bind


# --------------------------------------------------------------------------------------------
# Missing required values


def _bindings_for(configurable: Any, scopes: list[str]) -> dict[str, Any]:
    """The parameters gin binds for `configurable` called in `scopes` (outer scopes first)."""
    bound: dict[str, Any] = {}
    for depth in range(len(scopes) + 1):
        scope = "/".join(scopes[:depth])
        bound.update(gin_config._CONFIG.get((scope, configurable.selector), {}))
    return bound


def _is_required_marker(value: Any) -> bool:
    if value is gin.REQUIRED:
        return True
    return (isinstance(value, gin_config.ConfigurableReference) and value.configurable.name == "constant"
            and value.scopes == ["gin.REQUIRED"])


def _macro_value(reference: gin_config.ConfigurableReference) -> Any:
    """The value bound to macro `%NAME` (`_UNKNOWN` if it is never defined)."""
    bound = gin_config._CONFIG.get(("/".join(reference.scopes), reference.configurable.selector), {})
    return bound.get("value", _UNKNOWN)


def _references(value: Any, undefined_macros: list[str]) -> Iterator[gin_config.ConfigurableReference]:
    """The `@name()` references in a bound value (through macros and containers)."""
    if isinstance(value, gin_config.ConfigurableReference):
        if value.configurable.name == "macro":
            macro_value = _macro_value(value)
            if macro_value is _UNKNOWN:
                undefined_macros.append("/".join(value.scopes))
            else:
                yield from _references(macro_value, undefined_macros)
        elif value.evaluate and value.configurable.name != "constant":
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _references(item, undefined_macros)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item, undefined_macros)


def missing_required(selector: str, provided: collections.abc.Collection[str] = ()) -> list[str]:
    """What the call of `selector` (with `provided` passed by the caller) and of the `@name()`
    references bound below it would lack: `name.param` for a parameter whose value is
    `gin.REQUIRED` or that has no default and is not bound, and `%MACRO (used by name.param)`
    for a macro that is used but never defined."""
    root = gin_config._REGISTRY.get_match(selector)
    if root is None:
        raise ConfigError(f"no gin configurable named {selector!r}; import the module that defines it")
    missing: list[str] = []
    seen: set[tuple[str, str]] = set()

    def visit(configurable: Any, scopes: list[str], passed: collections.abc.Collection[str]) -> None:
        key = ("/".join(scopes), configurable.selector)
        if key in seen:
            return
        seen.add(key)
        try:
            signature = inspect.signature(configurable.wrapped)
        except (TypeError, ValueError):
            return
        bound = _bindings_for(configurable, scopes)
        prefix = "/".join(scopes) + "/" if scopes else ""
        name = f"{prefix}{_short_selector(configurable.selector)}"
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in passed:
                continue
            value = bound.get(param.name, param.default)
            if value is inspect.Parameter.empty or _is_required_marker(value):
                missing.append(f"{name}.{param.name}")
                continue
            if isinstance(value, gin_config.ConfigurableReference) and value.configurable.name == "macro":
                macro_value = _macro_value(value)
                if _is_required_marker(macro_value):
                    missing.append(f"{name}.{param.name} (via %{'/'.join(value.scopes)})")
                    continue
            undefined: list[str] = []
            for reference in list(_references(value, undefined)):
                visit(reference.configurable, [*scopes, *reference.scopes], ())
            missing.extend(f"%{macro} (used by {name}.{param.name}, never defined)" for macro in undefined)

    visit(root, [], provided)
    return missing


def check_required(selector: str, provided: collections.abc.Collection[str] = (), *, sources: str = "") -> None:
    """Raise one `ConfigError` line naming every required value `missing_required` finds."""
    missing = missing_required(selector, provided)
    if missing:
        where = f" after parsing {sources}" if sources else ""
        example = missing[0].split(" ")[0].lstrip("%").rsplit("/", 1)[-1]
        raise ConfigError(
            f"missing required gin value(s){where}: {', '.join(missing)}; bind each in a .gin file or "
            f"with --bind '{example}=...'"
        )
