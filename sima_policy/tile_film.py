"""Tile-aligned vision encoder + egocentric FiLM fusion (``model_config["vision_arch"] = "tile_ego"``).

Grid games (BabyAI renders 8x8-pixel tiles at 64x64) are read one cell per tile: a first conv with kernel =
stride = tile size gives a [C, G, G] grid of cell features, with no feature straddling two cells. The
fusion then re-centres that grid on the agent, turned so the agent faces up, and conditions every conv
block on the mission (FiLM: per-channel scale and shift from the language embedding).

Why: in a full-view frame every cue for the next action is a conjunction (where the agent is x which way
it faces x where the named object is). On 2,700 GoToLocal bot episodes the strided CNN ("conv": 300
steps on the true actions, 1,500 on latent labels) and this tile stem with FiLM + spatial-softmax
keypoints instead of the egocentric view (600-1,500 steps, with and without symmetry augmentation) stayed
at the action prior (52.5% val); one keypoint variant left it only after ~1,000 steps (66% at 2,000).
The egocentric view left it within the first 200 steps (67% val at 1,000 steps, true actions). ``genie-sima bc`` from latent labels,
2,000 steps: 65% val vs the true actions; GoToRedBall success 43% greedy / 72% sampled (random: 26%).

No BatchNorm, for the reason ``vision_encoder.py`` gives: rows never influence each other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _cell_grid(size: int, device) -> torch.Tensor:
    r = torch.linspace(-1.0, 1.0, size, device=device)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([yy, xx])  # [2, G, G]: (row, column) of each cell in [-1, 1]


class TileEncoder(nn.Module):
    """``images`` [B, H, W, 3] in [0, 255] -> cell features [B, C, G, G] (``features``) and an
    instruction-free embedding [B, out_dim] (``forward``; the auxiliary losses and the MoCo key encoder
    use it)."""

    def __init__(self, out_dim: int = 128, channels: int = 64, tile: int = 8, image_size: int = 64):
        super().__init__()
        if image_size % tile:
            raise ValueError(f"TileEncoder: image_size {image_size} is not a multiple of tile_size {tile}")
        self.stem = nn.Sequential(nn.Conv2d(3, channels, kernel_size=tile, stride=tile), nn.SiLU(),
                                  nn.Conv2d(channels, channels, kernel_size=1), nn.SiLU())
        # Per-cell LayerNorm over channels: raw stem outputs are ~0.05 and vary across frames by ~0.005
        # (most cells are the same floor/wall), which the cell coordinates and the first block's GroupNorm
        # then drown; normalised, every cell's content is O(1) and the object cells stand out.
        self.cell_norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(2 * channels, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.image_size, self.grid, self.channels, self.out_dim = image_size, image_size // tile, channels, out_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-3:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"TileEncoder expects [B, {self.image_size}, {self.image_size}, 3] frames, "
                             f"got {tuple(images.shape)}")
        x = images.reshape(-1, *images.shape[-3:]).float()  # [N, H, W, 3]
        # [0, 1], not [-1, 1]: an empty (black) cell is then all zeros, so the few object/agent cells are
        # the only inputs the stem sees beyond its bias.
        x = x.permute(0, 3, 1, 2) / 255.0  # [N, 3, H, W]
        cells = self.stem(x).permute(0, 2, 3, 1)  # [N, G, G, C]
        return self.cell_norm(cells).permute(0, 3, 1, 2)  # [N, C, G, G]

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([feats.amax(dim=(2, 3)), feats.mean(dim=(2, 3))], dim=1)  # [N, 2C]
        return self.norm(self.fc(pooled))  # [N, out_dim]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lead = images.shape[:-3]
        return self.embed(self.features(images)).reshape(*lead, self.out_dim)  # [B, out_dim]


# minigrid's agent_dir: 0 right, 1 down, 2 left, 3 up, as (row, col) steps
DIRECTION_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


class EgocentricFiLMFusion(nn.Module):
    """Re-centres the cell grid on the agent, turned so the agent faces up, then FiLM convs + MLP.

    A full-view frame makes every useful cue a conjunction (where the agent is x which way it faces x where
    the named object is); from pixels alone the policy stays at the action prior for thousands of steps.
    In the agent's own frame "the object is ahead / to my left" is one fixed place in the grid, as in
    BabyAI's egocentric observations. The agent's cell and direction come from two small detectors on the
    cell features (``agent_logits``/``direction_logits``), trained by the BC pipeline from what changes
    between consecutive frames (the agent's cell always does; a step forward also names its direction).
    The re-centring itself uses their argmax, so no gradient flows through it.

    ``conv_frame`` says where the FiLM convs run (both read the same egocentric view in the MLP):
    - "room": on the room's G x G grid, turned so the agent faces up; their output is then re-centred on
      the agent. A 3x3 conv commutes with the re-centring (a translation), so this is the egocentric view's
      convolution done on the G*G cells that exist instead of the S*S = (2G-1)^2 cells of the view, most of
      them outside the room: 3.5x fewer conv cells at G = 8 (``genie-sima bc``'s default).
    - "egocentric": on the S x S view itself, with an "outside the room" input channel (the first design;
      policies saved before "room" existed carry no ``conv_frame`` and load as this).
    """

    def __init__(self, channels: int, language_dim: int, hidden_dim: int, grid: int, blocks: int = 2,
                 conv_frame: str = "egocentric"):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"EgocentricFiLMFusion: film_blocks ({blocks}) must be >= 1")
        if conv_frame not in CONV_FRAMES:
            raise ValueError(f"EgocentricFiLMFusion: conv_frame {conv_frame!r} is not one of {CONV_FRAMES}")
        self.conv_frame = conv_frame
        self.grid, self.span = grid, 2 * grid - 1  # every cell of the room fits around any agent cell
        self.agent = nn.Conv2d(channels, 1, kernel_size=1)
        self.direction = nn.Conv2d(channels, 4, kernel_size=1)
        c_in = channels + 1  # + "outside the room" channel ("room": constant 0 inside, 1 in the conv padding)
        self.convs = nn.ModuleList([nn.Conv2d(c_in if i == 0 else channels, channels, 3, padding=1)
                                    for i in range(blocks)])
        self.norms = nn.ModuleList([nn.GroupNorm(1, channels) for _ in range(blocks)])
        self.films = nn.ModuleList([nn.Linear(language_dim, 2 * channels) for _ in range(blocks)])
        self.squeeze = nn.Conv2d(channels, 16, kernel_size=1)
        # "room": the view's "outside the room" mask is a 17th channel of the MLP's input (in "egocentric" the
        # convs' outputs there carry it). It also keeps either frame's weights from loading as the other.
        view_channels = 17 if conv_frame == "room" else 16
        self.mlp = nn.Sequential(nn.Linear(view_channels * self.span * self.span + language_dim, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        r = torch.arange(self.span) - (grid - 1)
        # offsets in the agent's frame, agent facing up: row -1 is the cell ahead
        self.register_buffer("ahead", r.view(-1, 1).expand(-1, self.span).clone(), persistent=False)  # [S, S]
        self.register_buffer("across", r.view(1, -1).expand(self.span, -1).clone(), persistent=False)  # [S, S]
        # "room": for each heading d, the room cell each cell of the turned grid reads ([4, G*G], flat
        # indices), and the inverse (where each room cell lands in the turned grid).
        turned = torch.stack([_turn_index(grid, step) for step in DIRECTION_STEPS])
        self.register_buffer("turn_src", turned, persistent=False)
        self.register_buffer("turn_dst", turned.argsort(1), persistent=False)
        border = torch.ones(1, 1, grid + 2, grid + 2)
        border[..., 1:-1, 1:-1] = 0.0
        self.register_buffer("border", border, persistent=False)  # [1, 1, G + 2, G + 2]

    def detect(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cells [B, C, G, G] -> agent cell logits [B, G*G], direction logits per cell [B, 4, G*G]."""
        return self.agent(cells).flatten(1), self.direction(cells).flatten(2)

    def egocentric(self, cells: torch.Tensor) -> torch.Tensor:
        """cells [B, C, G, G] -> [B, C + 1, S, S] centred on the detected agent, turned to face up, with an
        "outside the room" channel: the turned room re-centred (a turn about the room's centre, then a
        translation, is the turn about the agent)."""
        room, at = self.turned(cells)  # [B, C, G, G], [B]
        return self.centred(room, at, outside=True)

    def _agent(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cells [B, C, G, G] -> (the agent's flat cell index [B], its heading [B]) by the detectors' argmax."""
        agent_logits, dir_logits = self.detect(cells)
        at = agent_logits.argmax(1)  # [B]
        d = dir_logits.gather(2, at.view(-1, 1, 1).expand(-1, 4, 1))[:, :, 0].argmax(1)  # [B]
        return at, d

    def turned(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cells [B, C, G, G] -> (the room turned so the agent faces up [B, C, G, G], the agent's flat cell
        index in it [B])."""
        b, c, g, _ = cells.shape
        at, d = self._agent(cells)
        src = self.turn_src[d]  # [B, G*G]
        room = cells.flatten(2).gather(2, src.unsqueeze(1).expand(-1, c, -1)).view(b, c, g, g)  # [B, C, G, G]
        return room, self.turn_dst[d].gather(1, at.view(-1, 1))[:, 0]

    def centred(self, room: torch.Tensor, at: torch.Tensor, outside: bool = False) -> torch.Tensor:
        """room [B, C, G, G] already facing up, agent cell ``at`` [B] -> [B, C, S, S] centred on the agent,
        zero outside the room: the view ``egocentric`` builds, with its outside channel if ``outside``."""
        b, c, g, _ = room.shape
        rows = (at // g).view(-1, 1, 1) + self.ahead  # [B, S, S]: the view's row -1 is the cell ahead
        cols = (at % g).view(-1, 1, 1) + self.across
        inside = (rows >= 0) & (rows < g) & (cols >= 0) & (cols < g)  # [B, S, S]
        flat = (rows.clamp(0, g - 1) * g + cols.clamp(0, g - 1)).flatten(1)  # [B, S*S]
        view = room.flatten(2).gather(2, flat.unsqueeze(1).expand(-1, c, -1))  # [B, C, S*S]
        view = view.view(b, c, self.span, self.span) * inside.unsqueeze(1)  # [B, C, S, S]
        return torch.cat([view, (~inside).unsqueeze(1).to(view.dtype)], dim=1) if outside else view

    def forward(self, cells: torch.Tensor, lang: torch.Tensor) -> torch.Tensor:
        if self.conv_frame == "room":
            x, at = self.turned(cells)  # [B, C, G, G]
            # The first conv's padding is "outside the room" (channel C = 1), as in the egocentric view.
            x = torch.cat([F.pad(x, (1, 1, 1, 1)), self.border.expand(len(x), -1, -1, -1)], dim=1)  # [B, C + 1, G + 2, G + 2]
            pad = 0
        else:
            x, at, pad = self.egocentric(cells), None, 1  # [B, C + 1, S, S]
        for i, (conv, norm, film) in enumerate(zip(self.convs, self.norms, self.films)):
            scale, shift = film(lang).chunk(2, dim=-1)  # [B, C] each
            y = F.silu(norm(F.conv2d(x, conv.weight, conv.bias, padding=pad if i == 0 else 1))
                       * (1 + scale[..., None, None]) + shift[..., None, None])  # [B, C, G or S, G or S]
            x = y if i == 0 else x + y
        x = self.squeeze(x)  # [B, 16, G or S, G or S]
        if at is not None:
            x = self.centred(x, at, outside=True)  # [B, 17, S, S]
        return self.mlp(torch.cat([x.flatten(1), lang], dim=1))  # [B, hidden_dim]


CONV_FRAMES = ("egocentric", "room")


def _turn_index(grid: int, step: tuple[int, int]) -> torch.Tensor:
    """[G*G]: for each cell (r', c') of the room turned so that ``step`` (the agent's heading) points up, the
    flat index of the room cell it shows: a rotation about the room's centre, the egocentric view's turn."""
    ar, ac = step
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    twice_centre = grid - 1
    # 2 * (source - centre) = -(2r' - (G-1)) * ahead + (2c' - (G-1)) * right, right = (ac, -ar)
    fwd, side = -(2 * r - twice_centre), 2 * c - twice_centre
    src_r = (twice_centre + fwd * ar + side * ac) // 2
    src_c = (twice_centre + fwd * ac - side * ar) // 2
    return (src_r * grid + src_c).flatten()
