"""Register ``genie-sima/World-v0`` with gymnasium (entry points are strings: nothing heavy is imported)."""

import gymnasium as gym

ENV_ID = "genie-sima/World-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="genie_world.gym_env:WorldModelEnv",
                 vector_entry_point="genie_world.gym_env:WorldVectorEnv")
