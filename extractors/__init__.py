"""Policy-extraction strategies for flowrl, one file each; importing this package registers them.

Every public module here (no leading underscore) is imported, so adding a strategy is adding a
file with an `@register_extractor("name")` class — no list to edit. `flowrl.registry.REGISTRY`
maps names to classes once this package is imported.
"""

import importlib
import pkgutil

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from extractors.bam import BAM as BAM  # noqa: E402
from extractors.qam import QAM as QAM  # noqa: E402
from extractors.qam import lean_adjoint_matching_loss as lean_adjoint_matching_loss  # noqa: E402
