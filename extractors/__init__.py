"""Policy-extraction strategies for flowrl, one file each; importing this package registers them.

`flowrl.registry.REGISTRY` maps names to classes once this package is imported.
"""

from extractors.bam import BAM as BAM
from extractors.qam import QAM as QAM
from extractors.qam import lean_adjoint_matching_loss as lean_adjoint_matching_loss
