"""The reference DiT: official names and shapes, every registry config, and the official function."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditexport.checkpoint import check_state_dict, infer_config
from ditexport.model import DIT_CONFIGS, DiT, create_model, get_config, get_2d_sincos_pos_embed

OFFICIAL = {  # name: (depth, hidden, patch, heads), from the official models.py factories
    "DiT-XL/2": (28, 1152, 2, 16), "DiT-XL/4": (28, 1152, 4, 16), "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16), "DiT-L/4": (24, 1024, 4, 16), "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12), "DiT-B/4": (12, 768, 4, 12), "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6), "DiT-S/4": (12, 384, 4, 6), "DiT-S/8": (12, 384, 8, 6),
}


def official_state_dict_shapes(depth, hidden, patch, input_size, in_ch=4, classes=1000, learn_sigma=True):
    """Key names and shapes of an official DiT checkpoint, written out from the official architecture."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    shapes = {
        "pos_embed": (1, (input_size // patch) ** 2, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch), "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return shapes


@pytest.mark.parametrize("name", list(OFFICIAL))
@pytest.mark.parametrize("image_size", [256, 512])
def test_registry_matches_official_configs_and_output_shapes(name, image_size):
    cfg = get_config(name, image_size=image_size)
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads) == OFFICIAL[name]
    assert cfg.input_size == image_size // 8 and cfg.in_channels == 4 and cfg.num_classes == 1000
    with torch.device("meta"):  # shapes only: no memory for XL weights
        model = DiT.from_config(cfg)
        out = model(torch.empty(3, 4, cfg.input_size, cfg.input_size), torch.empty(3), torch.empty(3, dtype=torch.long))
    assert out.shape == (3, 8, cfg.input_size, cfg.input_size)


@pytest.mark.parametrize("name", ["DiT-tiny/2", "DiT-digits"])
def test_small_configs_run_for_real(name):
    model = create_model(name, seed=0)
    cfg = model.config
    x = torch.randn(5, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(x, torch.tensor([0, 1, 500, 998, 999]), torch.tensor([0, 1, 2, 3, cfg.num_classes]))
    assert out.shape == (5, cfg.out_channels, cfg.input_size, cfg.input_size)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3


@pytest.mark.parametrize("image_size", [256, 512])
def test_official_xl2_state_dict_loads_strictly_and_config_is_inferred(image_size):
    shapes = official_state_dict_shapes(28, 1152, 2, image_size // 8)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = infer_config(sd)
    assert cfg == get_config("DiT-XL/2", image_size=image_size)
    with torch.device("meta"):
        model = DiT.from_config(cfg)
    check_state_dict(model, sd)
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(shapes)


def test_official_initialisation_zeroes_adaln_and_output():
    model = DiT.from_config(get_config("DiT-tiny/2"))
    x = torch.randn(2, 4, 8, 8)
    assert torch.count_nonzero(model(x, torch.tensor([3, 7]), torch.tensor([1, 2]))) == 0
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_pos_embed_is_the_fixed_2d_sincos_embedding():
    model = DiT.from_config(get_config("DiT-tiny/2"))
    grid = 4
    pe = model.pos_embed[0].numpy()
    # Token (row r, col c): first half encodes the column (w goes first in the meshgrid), second the row.
    d = 64 // 4
    omega = 1.0 / 10000 ** (np.arange(d) / d)
    r, c = 2, 3
    expected = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
    np.testing.assert_allclose(pe[r * grid + c], expected, atol=1e-6)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(64, grid), pe, atol=1e-7)


def reference_forward(sd, cfg, x, t, y):
    """The official DiT forward written out from its definition, functionally, from a state dict."""
    D, p, H = cfg.hidden_size, cfg.patch_size, cfg.num_heads
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    silu = lambda v: v * torch.sigmoid(v)
    gelu_tanh = lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_emb = lin(silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    N, T, _ = h.shape
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mod = lin(silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = ln(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
        h = h + mod[2][:, None] * lin(att.transpose(1, 2).reshape(N, T, D), b + "attn.proj")
        m = ln(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = h + mod[5][:, None] * lin(gelu_tanh(lin(m, b + "mlp.fc1")), b + "mlp.fc2")
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g, C = cfg.input_size // p, cfg.out_channels
    h = h.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(N, C, g * p, g * p)


@pytest.mark.parametrize("name", ["DiT-tiny/2", "DiT-digits"])
def test_model_computes_the_official_function(name):
    model = create_model(name, seed=3)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([0, 250, 731, 999])
    y = torch.tensor([0, 5, 9, cfg.num_classes])  # the last is the null class
    with torch.no_grad():
        ours = model(x, t, y)
        ref = reference_forward(model.state_dict(), cfg, x, t, y)
    assert ref.abs().mean() > 1e-2  # random non-zero weights give a non-trivial output
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_condition_split_equals_forward():
    model = create_model("DiT-tiny/2", seed=0)
    x = torch.randn(3, 4, 8, 8)
    t, y = torch.tensor([1, 400, 999]), torch.tensor([2, 10, 7])
    with torch.no_grad():
        c = model.embed_condition(t, y)
        assert c.shape == (3, 64)
        torch.testing.assert_close(model.forward_with_condition(x, c), model(x, t, y), rtol=0, atol=0)


def test_label_dropout_only_in_training():
    model = create_model("DiT-tiny/2", seed=0)
    y = torch.arange(10).repeat(50)
    emb = model.y_embedder
    assert torch.equal(emb(y, train=False), emb.embedding_table(y))
    torch.manual_seed(0)
    dropped = (emb.token_drop(y) == 10).float().mean()
    assert 0.05 < dropped < 0.15  # class_dropout_prob = 0.1
    forced = emb.token_drop(y[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, 1, 10, 3]


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model config 'DiT-XXL/2'"):
        get_config("DiT-XXL/2")
    assert len([n for n in DIT_CONFIGS if n in OFFICIAL]) == 12
