"""genie_world: the Genie-style world model (tokenizer, latent actions, dynamics, World, servers).

The model parts arrive with the world-model issue; this package owns them and must not import
``sima_policy`` or RLlib.
"""

__version__ = "0.1.0"
