"""Mission negatives in the reward/termination head's stage: the head learns that a frame ends only the
mission that names what the agent faces, which the data alone does not teach it."""

from __future__ import annotations

import dataclasses

import torch

from genie_world.config import resolve_config
from genie_world.mission_negatives import mission_negatives, names_other_goal
from genie_world.reward_head import RewardHead
from genie_world.text_encoder import Vocabulary
from pipelines.pretrain_stages import stage_loss

COLOURS = ("red", "green", "blue", "purple")  # object tokens 2..5; 1 is the agent, 0 the floor
SIDE = 4


class GridTokenizer:
    """A frozen 'tokenizer' whose frames already are token grids: pixel (y, x, 0) is the token id."""

    def encode(self, frames: torch.Tensor):
        b, t = frames.shape[:2]
        return None, frames[..., 0].reshape(b, t, SIDE * SIDE).long()  # [B, T, P]


def _batch(n: int, g: torch.Generator) -> dict:
    """Transitions as a game records them: the agent at (0, 0) facing east; the episode ends when the
    tile in front holds the object the mission names, so in the data every frame with an object in
    front comes with that object's mission, and frames with the floor in front with any mission."""
    grid = torch.zeros(n, SIDE, SIDE, dtype=torch.uint8)
    grid[:, 0, 0] = 1
    target = torch.randint(0, len(COLOURS), (n,), generator=g)
    ends = torch.rand(n, generator=g) < 0.5
    grid[:, 0, 1] = torch.where(ends, target + 2, torch.zeros_like(target)).to(torch.uint8)
    cell = 2 + torch.randint(0, SIDE * SIDE - 2, (n,), generator=g)  # a distractor somewhere else
    grid.view(n, -1)[torch.arange(n), cell] = (2 + torch.randint(0, len(COLOURS), (n,), generator=g)).to(torch.uint8)
    frames = grid[:, None, :, :, None].expand(n, 2, SIDE, SIDE, 3).contiguous()  # [B, 2, S, S, 3]
    return {"frames": frames, "rewards": ends.float()[:, None].repeat(1, 2), "terminated": ends[:, None].repeat(1, 2),
            "mission": [f"go to the {COLOURS[int(c)]} ball" for c in target]}


def _fire_rate_on_other_missions(negatives: int) -> float:
    torch.manual_seed(0)
    cfg = dataclasses.replace(resolve_config("micro"), head_mission_negatives=negatives, text_max_len=5)
    vocab = Vocabulary.from_texts(f"go to the {c} ball" for c in COLOURS)
    head = RewardHead(len(vocab), 5, 6, SIDE * SIDE, 32, 2, 2, term_pos_weight=1.0)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        loss, _ = stage_loss("heads", head, {"tokenizer": GridTokenizer()}, _batch(64, g), vocab, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Frames with an object in front, under a mission naming another colour: never an end in the game.
    b = _batch(512, torch.Generator().manual_seed(1))
    end = b["terminated"][:, 0]
    front = b["frames"][end, 1, 0, 1, 0].long() - 2
    other = [f"go to the {COLOURS[(int(c) + 1) % len(COLOURS)]} ball" for c in front]
    _, ids = GridTokenizer().encode(b["frames"][end][:, 1:2])
    with torch.no_grad():
        _, logit = head(vocab.encode_batch(other, 5), ids[:, 0])
        _, own = head(vocab.encode_batch([b["mission"][i] for i in end.nonzero().flatten()], 5), ids[:, 0])
    assert (own > 0).float().mean() > 0.9  # the real ends are still found either way
    return float((logit > 0).float().mean())


def test_mission_negatives_teach_the_head_which_object_the_mission_names():
    assert _fire_rate_on_other_missions(2) < 0.1
    assert _fire_rate_on_other_missions(0) > 0.5  # without them the head fires on any object in front


def test_only_missions_of_the_same_shape_that_name_another_goal_are_negatives():
    assert names_other_goal("go to the red ball", "go to the blue ball")
    assert not names_other_goal("go to the red ball", "go to a red ball")  # articles do not change the goal
    assert not names_other_goal("go to the red ball", "Go to the red ball.")  # read as the head reads words
    assert not names_other_goal("go to the red ball", "go to a ball")  # may be satisfied by the same frame
    assert not names_other_goal("go to the red ball", "put the red ball next to the blue key")
    missions = ["go to the red ball", "go to a red ball", "go to the blue key", "go to a ball"]
    rows, other = mission_negatives(missions, torch.tensor([True, False, False, False]), 3,
                                    torch.Generator().manual_seed(0))
    assert rows.tolist() == [0] and other.tolist() == [2]
    rows, other = mission_negatives(missions, torch.tensor([True, False, True, False]), 0)
    assert len(rows) == len(other) == 0


def test_rows_without_a_known_reward_train_only_termination():
    head = RewardHead(4, 2, 6, 4, 16, 2, 1)
    text, ids = torch.ones(3, 2, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)
    term, known = torch.tensor([True, False, False]), torch.tensor([True, True, False])
    a, _ = head.loss(text, ids, torch.tensor([1.0, 0.0, 0.0]), term, reward_known=known)
    b, _ = head.loss(text, ids, torch.tensor([1.0, 0.0, 5.0]), term, reward_known=known)
    assert torch.allclose(a, b)
