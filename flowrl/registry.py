"""The extractor registry: names → classes, each also registered with gin.

`@register_extractor("qam")` puts the class in `REGISTRY` and registers it with gin under the same
name (module `extractors`; a '-' becomes '_', as gin identifiers require: `qam-fql` → `@qam_fql()`),
so a gin file can say `train.extractor = @qam()` and bind `qam.inv_temp = 1.0`. Library code never switches on names; names live here and in gin files.
"""

from __future__ import annotations

import gin

from flowrl.extractor import AbstractExtractor

REGISTRY: dict[str, type[AbstractExtractor]] = {}


def gin_name(name: str) -> str:
    """The gin name of a registry name: gin identifiers cannot hold '-', so 'qam-fql' → 'qam_fql'."""
    return name.replace("-", "_")


def register_extractor(name: str):
    """Class decorator: `REGISTRY[name] = cls` and `gin.register(name, module="extractors")(cls)`."""

    def decorate(cls: type[AbstractExtractor]) -> type[AbstractExtractor]:
        if not (isinstance(cls, type) and issubclass(cls, AbstractExtractor)):
            raise TypeError(f"@register_extractor({name!r}) needs an AbstractExtractor subclass, got {cls!r}")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"extractor name {name!r} is already registered to {REGISTRY[name].__qualname__}")
        REGISTRY[name] = cls
        gin.register(gin_name(name), module="extractors")(cls)
        return cls

    return decorate


ENTRY_POINT_GROUP = "flowrl.extractors"


def load_extractor_plugins() -> list[str]:
    """Import every package declared in the `flowrl.extractors` entry-point group.

    This is how the CLI finds strategies without `flowrl/` importing `extractors/`: the bundled
    package is declared in pyproject.toml, and a third-party package registers its own
    extractors by declaring `[project.entry-points."flowrl.extractors"] name = "its_package"`.
    Returns the names of the loaded entry points.
    """
    from importlib.metadata import entry_points

    loaded = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()
        loaded.append(entry_point.name)
    return loaded


def get_extractor(name: str) -> type[AbstractExtractor]:
    """The class registered as `name`; a clear error listing the registered names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY)) or "(none: import the `extractors` package first)"
        raise KeyError(f"unknown extractor {name!r}; registered extractors: {known}") from None


def registered_names() -> list[str]:
    return sorted(REGISTRY)
