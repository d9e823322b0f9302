"""flowrl: flow-matching policies for offline and offline-to-online RL.

Policy extraction — how an expressive flow policy is improved against a learned critic — is a
pluggable strategy object (`flowrl.AbstractExtractor`); QAM (Q-learning with Adjoint Matching,
Li & Levine, ICLR 2026) is the reference strategy, in the separate `extractors` package.
"""

__version__ = "0.1.0"
