"""The reference DiT: the adaLN-Zero Diffusion Transformer of Peebles & Xie (2023).

Computes the same function as the official `facebookresearch/DiT` `models.py` and keeps its parameter
names and shapes, so an official checkpoint such as `DiT-XL-2-256x256.pt` loads with `strict=True`.
The module knows nothing of ONNX or runtimes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                  Configuration                                #
#################################################################################

@dataclass(frozen=True)
class DiTConfig:
    """The official constructor arguments; defaults are DiT-XL/2 at 256 px."""
    input_size: int = 32            # latent side: image side / 8 for the SD VAE (256 px -> 32)
    patch_size: int = 2
    in_channels: int = 4            # SD VAE latents have 4 channels
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class row used by classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True        # output 2*C channels: epsilon and the variance interpolation

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


# The twelve official sizes (depth, hidden, heads) per patch size, named as in the official registry.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items()
    for patch in (2, 4, 8)
}
# Small configs for tests and the built-in model.
DIT_CONFIGS["DiT-tiny/2"] = DiTConfig(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                      num_classes=10)
DIT_CONFIGS["DiT-digits"] = DiTConfig(input_size=8, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                                      num_classes=10)


def get_config(name: str, image_size: int | None = None, **overrides) -> DiTConfig:
    """Look up a config by its official name; `image_size` (256 or 512) sets the latent side to size/8."""
    if name not in DIT_CONFIGS:
        raise UsageError(f"unknown model config {name!r}; choose one of: {', '.join(DIT_CONFIGS)}")
    cfg = DIT_CONFIGS[name]
    if image_size is not None:
        if image_size % 8:
            raise UsageError(f"image size must be a multiple of 8, got {image_size}")
        overrides["input_size"] = image_size // 8
    return replace(cfg, **overrides)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Module):
    """Image to patch tokens: a Conv2d with kernel = stride = patch, then flatten."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: 256 sinusoidal frequencies, then an MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps, possibly fractional -> (N, dim) embedding ordered cat[cos, sin]."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # float32, as in the official code
        # A half-precision MLP needs its input in its own dtype; in float32 this cast is a no-op.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; row `num_classes` is the null class used for classifier-free guidance."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replaces labels by the null class, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's parameter names)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                        # (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)    # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear - tanh-GELU - Linear (timm's parameter names fc1, fc2)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN (shift, scale) and a linear map to patch pixels."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""
    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
    ):
        super().__init__()
        self.config = DiTConfig(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                                class_dropout_prob, num_classes, learn_sigma)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = self.config.out_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, kept as a parameter so it is in the state dict as in official files.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, cfg: DiTConfig) -> "DiT":
        return cls(**cfg.to_dict())

    def initialize_weights(self):
        """The official initialisation: xavier linears, sin-cos pos_embed, zero adaLN and output layers."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # initialise like nn.Linear, not nn.Conv2d
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed_condition(self, t, y):
        """The conditioning vector c = t_emb + y_emb that drives every adaLN modulation: (N,), (N,) -> (N, D)."""
        return self.t_embedder(t) + self.y_embedder(y, self.training)

    def forward_with_condition(self, x, c):
        """The transformer given the conditioning vector c (N, D) instead of (t, y)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        for block in self.blocks:
            x = block(x, c)                      # (N, T, D)
        x = self.final_layer(x, c)               # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x)                # (N, out_channels, H, W)

    def forward(self, x, t, y):
        """x: (N, C, H, W) images or latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        return self.forward_with_condition(x, self.embed_condition(t, y))


def randomize_weights(model: DiT, seed: int = 0, std: float = 0.02) -> DiT:
    """Gives every zero-initialised layer random non-zero weights, for tests (a zero-init DiT outputs zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def create_model(cfg: DiTConfig | str, seed: int | None = None, **overrides) -> DiT:
    """A DiT from a config or registry name; with `seed`, random non-zero weights (for tests and benchmarks)."""
    if isinstance(cfg, str):
        cfg = get_config(cfg, **overrides)
    elif overrides:
        cfg = replace(cfg, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = DiT.from_config(cfg)
    if seed is not None:
        randomize_weights(model, seed)
    return model.eval()


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) fixed 2-D embedding; half the dimensions encode each axis."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)                       # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M,) positions -> (M, embed_dim) ordered cat[sin, cos]."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega                # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
