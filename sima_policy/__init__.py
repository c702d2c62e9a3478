"""sima_policy: the SIMA-style instruction-following agent (RLModule, Learner, auxiliary losses).

Must not import ``pipelines``.
"""

__version__ = "0.1.0"
