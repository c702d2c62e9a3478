"""genie_world: the Genie-style world model (tokenizer, latent actions, dynamics, World, servers).

This package owns the model parts and the imagined envs; it must not import ``sima_policy`` or RLlib.
Importing it registers the gymnasium id ``genie-sima/World-v0``.
"""

__version__ = "0.1.0"

from . import gym_registration  # noqa: E402,F401
