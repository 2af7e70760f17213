"""How far diffusers' DiTTransformer2DModel computes from the official DiT (docs/diffusers.md): the relative
error of the model output on random weights, for each of diffusers' two differences alone and both undone, and
the relative error of the timestep embedding's sinusoidal features themselves (independent of the weights).

    python benchmarks/diffusers_drift.py --config DiT-XL/2 --image-size 256
"""
from __future__ import annotations

import argparse

import torch


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def set_differences(model, frequencies: bool, norm_eps: bool) -> None:
    """Puts diffusers' timestep frequencies and MLP norm eps (on) or the official ones (off) into `model`."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1 if frequencies else 0
        block.norm3.eps = model.config.norm_eps if norm_eps else 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import get_timestep_embedding

    from ditexport.diffusers_format import config_to_diffusers, diffusers_to_official
    from ditexport.model import DiT, TimestepEmbedder, get_config

    t_all = torch.arange(1000)
    features = (TimestepEmbedder.timestep_embedding(t_all, 256),
                get_timestep_embedding(t_all, 256, flip_sin_to_cos=True, downscale_freq_shift=1))
    per_t = (features[0] - features[1]).norm(dim=1) / features[0].norm(dim=1)
    print("timestep features (256), diffusers vs official, relative error at t = "
          + ", ".join(f"{t}: {per_t[t]:.2e}" for t in (1, 10, 100, 500, 999)) + f"; mean over 0..999 {per_t.mean():.2f}")

    config = get_config(args.config, image_size=args.image_size)
    torch.manual_seed(args.seed)
    theirs = DiTTransformer2DModel(**config_to_diffusers(config)).eval()  # diffusers' own random initialisation
    shared = theirs.transformer_blocks[0].norm1.emb.state_dict()
    for block in theirs.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)  # one embedder, as in a model converted from an official one
    ours = DiT.from_config(config).eval()
    ours.load_state_dict(diffusers_to_official(theirs.state_dict(), config), strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, config.in_channels, config.input_size, config.input_size, generator=gen)
    t, y = torch.tensor([0, 50, 500, 999]), torch.tensor([0, 3, 9, config.num_classes])
    with torch.no_grad():
        reference = ours(x, t, y)
        for label, frequencies, norm_eps in (("as diffusers computes it", True, True),
                                             ("timestep frequencies only", True, False),
                                             (f"MLP norm eps {theirs.config.norm_eps:g} only", False, True),
                                             ("both undone", False, False)):
            set_differences(theirs, frequencies, norm_eps)
            print(f"{args.config} at {args.image_size} px, output relative error, {label}: "
                  f"{relative_error(theirs(x, t, y).sample, reference):.2e}")


if __name__ == "__main__":
    main()
