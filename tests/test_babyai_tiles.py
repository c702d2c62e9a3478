"""Reading BabyAI frames back as tiles (the prompt-faithfulness check): real frames are read exactly."""

from __future__ import annotations

import numpy as np

from pipelines.data.babyai_game import BabyAIGame
from pipelines.data.babyai_tiles import classify_tiles, level_contents, prompt_object, reference_tiles


def test_real_first_frames_show_their_mission_object_and_one_agent():
    game = BabyAIGame("BabyAI-GoToLocal-v0")
    for seed in range(12):
        frame = game.reset(seed)
        u = game.unwrapped
        grid = classify_tiles(frame[None])[0]
        ax, ay = u.agent_pos
        assert grid[ay, ax] == f"agent_{u.agent_dir}"
        for j in range(u.height):
            for i in range(u.width):
                obj = u.grid.get(i, j)
                if obj is not None and obj.type != "wall":
                    assert grid[j, i] == f"{obj.color} {obj.type}"
        c = level_contents(frame[None], game.mission)
        assert c["has_object"][0] and c["one_agent"][0] and c["unknown_tiles"][0] == 0
    game.close()


def test_levels_without_the_object_or_with_two_agents_fail():
    names, tiles = reference_tiles()
    tile = {n: t for n, t in zip(names, tiles)}
    grid = [["wall"] * 8] + [["wall"] + ["floor"] * 6 + ["wall"] for _ in range(6)] + [["wall"] * 8]
    grid[3][3], grid[4][4] = "agent_0", "blue key"

    def frame(g):
        return np.concatenate([np.concatenate([tile[n] for n in row], 1) for row in g], 0)[None]

    assert level_contents(frame(grid), "go to the blue key")["has_object"][0]
    assert not level_contents(frame(grid), "go to the red ball")["has_object"][0]
    assert level_contents(frame(grid), "go to a key")["has_object"][0]
    grid[1][1], grid[2][6] = "blue key", "blue ball"
    assert level_contents(frame(grid), "go to the blue key")["named_objects"][0] == 2
    assert level_contents(frame(grid), "go to the red ball")["named_objects"][0] == 0
    grid[5][5] = "agent_2"
    assert not level_contents(frame(grid), "go to the blue key")["one_agent"][0]
    noise = frame(grid).copy()
    noise[0, 8:16, 8:16] = 128  # a grey square is no tile of the game
    assert level_contents(noise, "go to the blue key")["unknown_tiles"][0] == 1
    assert prompt_object("go to the red ball") == ("red", "ball") and prompt_object("walk around") is None
