"""Readers: one small CNN with a head per attribute that reads a picture of the world back into attributes.

Trained on fresh renders, roughened (blur, noise, colour shifts, and optionally the world model's VAE round trip)
so that it also reads generated pictures, which are never as clean as renders. `accuracy` reports how well it reads
renders it has never seen.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench.quality import world


class Readers(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        channels = (3, width, width * 2, width * 4, width * 4)
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in world.ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, 3, 64, 64] in [0, 1] -> {attribute: logits [B, values]}."""
        features = self.body(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """{attribute: LongTensor [B]} of the most likely values."""
        self.eval()
        device = next(self.parameters()).device
        found: dict[str, list[torch.Tensor]] = {name: [] for name in world.ATTRIBUTES}
        for start in range(0, images.shape[0], batch):
            logits = self(images[start:start + batch].to(device))
            for name, value in logits.items():
                found[name].append(value.argmax(dim=1).cpu())
        return {name: torch.cat(values) for name, values in found.items()}


def roughen(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur by a random amount, shift colours a little and add noise (per picture)."""
    count, device = images.shape[0], images.device

    def uniform(*shape) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(device)

    sigma = uniform(count) * 1.2 + 1e-3
    taps = torch.arange(-2, 3, device=device, dtype=torch.float32)
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 5]
    flat = images.reshape(1, count * 3, *images.shape[2:])
    k = kernel.repeat_interleave(3, dim=0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k.view(-1, 1, 1, 5), groups=count * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k.view(-1, 1, 5, 1), groups=count * 3)
    out = flat.view_as(images)
    out = out * (1 + (uniform(count, 1, 1, 1) - 0.5) * 0.15) + (uniform(count, 3, 1, 1) - 0.5) * 0.08
    out = out + torch.randn(out.shape, generator=generator).to(device) * uniform(count, 1, 1, 1) * 0.04
    return out.clamp(0, 1)


def train_readers(steps: int, *, batch: int = 128, device: str = "cpu", seed: int = 0, width: int = 32,
                  round_trip=None, log=print) -> Readers:
    """Train on fresh renders. `round_trip(images) -> images` (e.g. the VAE's encode + decode) is applied to half
    of each batch when given."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    readers = Readers(width).to(device)
    optimizer = torch.optim.AdamW(readers.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    readers.train()
    for step in range(steps):
        attrs = {k: v.to(device) for k, v in world.sample(batch, generator).items()}
        images = world.render(attrs, generator)
        if round_trip is not None:
            half = batch // 2
            with torch.no_grad():
                images = torch.cat([round_trip(images[:half]).float().clamp(0, 1), images[half:]])
        images = roughen(images, generator)
        logits = readers(images)
        loss = sum(F.cross_entropy(logits[name], attrs[name]) for name in world.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"readers step {step + 1}/{steps} loss {loss.item():.4f}")
    return readers.eval()


def accuracy(readers: Readers, count: int = 1024, seed: int = 12345, roughened: bool = False) -> dict[str, float]:
    """Fraction of fresh renders (seed `seed`, never trained on) whose attribute each head reads right."""
    generator = torch.Generator().manual_seed(seed)
    attrs = world.sample(count, generator)
    images = world.render(attrs, generator)
    if roughened:
        images = roughen(images, generator)
    found = readers.read(images)
    return {name: float((found[name] == attrs[name]).float().mean()) for name in world.ATTRIBUTES}


def save_readers(readers: Readers, path: Path) -> Path:
    from safetensors.torch import save_file

    width = readers.body[0].out_channels
    save_file({k: v.detach().cpu().contiguous() for k, v in readers.state_dict().items()}, str(path),
              metadata={"width": str(width)})
    return path


def load_readers(path: Path, device: str = "cpu") -> Readers:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        width = int(f.metadata()["width"])
    readers = Readers(width)
    readers.load_state_dict(load_file(str(path)))
    return readers.to(device).eval()
