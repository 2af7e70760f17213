"""The sampler against an independent float64 implementation of the official formulas."""
import math

import numpy as np
import pytest
import torch

from ditexport.diffusion import create_diffusion, linear_betas, space_timesteps
from ditexport.sampler import Sampler, SamplerConfig, apply_guidance
from ditexport.model import create_model


# ----------------------------------------------------------------------------- independent reference (float64)

def ref_schedule(kept: list[int]):
    """alpha-bar over 1000 linear betas, then the respaced chain's betas, straight from the definitions."""
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_kept = abar[kept]
    abar_prev = np.concatenate([[1.0], abar_kept[:-1]])
    return 1 - abar_kept / abar_prev, abar_kept, abar_prev


def ref_ddpm_step(i, x, eps, v, kept, learn_sigma=True, noise=None):
    """One ancestral step at index i of the respaced chain (Ho et al. posterior, Nichol & Dhariwal variance)."""
    b, ab, abp = ref_schedule(kept)
    x0 = (x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])
    mean = (math.sqrt(abp[i]) * b[i] / (1 - ab[i])) * x0 + (math.sqrt(1 - b[i]) * (1 - abp[i]) / (1 - ab[i])) * x
    post_var = b * (1 - abp) / (1 - ab)
    post_log_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    if learn_sigma:
        frac = (v + 1) / 2
        log_var = frac * np.log(b[i]) + (1 - frac) * post_log_clipped[i]
    else:
        log_var = np.log(np.concatenate([[post_var[1]], b[1:]]))[i]
    return mean if i == 0 else mean + np.exp(0.5 * log_var) * noise


def ref_ddim_step(i, x, eps, kept, eta=0.0, noise=None):
    _, ab, abp = ref_schedule(kept)
    x0 = (x - math.sqrt(1 - ab[i]) * eps) / math.sqrt(ab[i])
    sigma = eta * math.sqrt((1 - abp[i]) / (1 - ab[i])) * math.sqrt(1 - ab[i] / abp[i])
    out = math.sqrt(abp[i]) * x0 + math.sqrt(1 - abp[i] - sigma ** 2) * eps
    return out if (i == 0 or noise is None) else out + sigma * noise


def toy_model(x, t, y):
    """A deterministic stand-in network (the input of the sampler, not the system under test)."""
    tt = t.float()[:, None, None, None] / 1000
    yy = y.float()[:, None, None, None]
    eps = torch.tanh(0.7 * x + 0.3 * tt + 0.05 * yy)
    v = torch.tanh(0.2 * x - 0.4 * tt + 0.1 * yy)
    return torch.cat([eps, v], dim=1)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ------------------------------------------------------------------------------------------------- schedules

def test_linear_betas_float64():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15 and len(b) == 1000


def test_space_timesteps_official_sets():
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:5] == [0, 4, 8, 12, 16] and s250[-4:] == [987, 991, 995, 999]
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    s50 = sorted(space_timesteps(1000, "50"))
    assert s50[:5] == [0, 20, 41, 61, 82] and s50[-1] == 999  # evenly spread, both ends kept
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert sorted(space_timesteps(100, "10,5")) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim300")


@pytest.mark.parametrize("respacing", ["250", "ddim50", "17"])
def test_respaced_coefficients_match_reference(respacing):
    d = create_diffusion(respacing)
    kept = sorted(space_timesteps(1000, respacing))
    b, ab, abp = ref_schedule(kept)
    assert list(d.timestep_map) == kept
    assert rel(d.betas, b) < 1e-12 and rel(d.alphas_cumprod, ab) < 1e-12
    post_var = b * (1 - abp) / (1 - ab)
    assert rel(d.posterior_variance, post_var) < 1e-12
    assert rel(d.posterior_mean_coef1, np.sqrt(abp) * b / (1 - ab)) < 1e-12
    assert rel(d.posterior_mean_coef2, np.sqrt(1 - b) * (1 - abp) / (1 - ab)) < 1e-12


# ------------------------------------------------------------------------------------------------ the steps

def _run_and_reference(cfg: SamplerConfig, learn_sigma=True, n=3, seed=5):
    sampler = Sampler(cfg, in_channels=1, num_classes=10, learn_sigma=learn_sigma)
    labels = torch.tensor([1, 4, 9][:n])
    x_T, noise = sampler.make_noise((n, 1, 4, 4), seed)
    ours = sampler.run(toy_model, x_T, labels, noise)

    kept = sorted(space_timesteps(1000, cfg.respacing or str(cfg.num_steps)))
    x = x_T.double().numpy()
    y = labels.numpy()
    for k, i in enumerate(reversed(range(len(kept)))):
        t = torch.full((n,), kept[i])
        if cfg.guidance_scale != 1.0:
            both = toy_model(torch.from_numpy(np.concatenate([x, x])).float(), torch.cat([t, t]),
                             torch.from_numpy(np.concatenate([y, np.full_like(y, 10)]))).double().numpy()
            cond, uncond = both[:n], both[n:]
            eps = uncond[:, :1] + cfg.guidance_scale * (cond[:, :1] - uncond[:, :1])
            v = cond[:, 1:]
        else:
            out = toy_model(torch.from_numpy(x).float(), t, torch.from_numpy(y)).double().numpy()
            eps, v = out[:, :1], out[:, 1:]
        step_noise = None if noise is None else noise[k].double().numpy()
        if cfg.method == "ddpm":
            x = ref_ddpm_step(i, x, eps, v, kept, learn_sigma, step_noise)
        else:
            x = ref_ddim_step(i, x, eps, kept, cfg.eta, step_noise)
    return ours.numpy(), x


@pytest.mark.parametrize("cfg", [
    SamplerConfig(num_steps=25, method="ddpm", guidance_scale=4.0),
    SamplerConfig(num_steps=25, method="ddpm", guidance_scale=1.0),
    SamplerConfig(num_steps=20, method="ddim", guidance_scale=1.5, eta=0.0),
    SamplerConfig(num_steps=20, method="ddim", guidance_scale=1.0, eta=0.5),
    SamplerConfig(num_steps=10, method="ddim", respacing="ddim10"),
], ids=["ddpm-cfg4", "ddpm", "ddim-cfg", "ddim-eta", "ddim-stride"])
def test_sampler_matches_float64_reference(cfg):
    ours, ref = _run_and_reference(cfg)
    assert rel(ours, ref) < 1e-6, rel(ours, ref)


def test_single_learned_range_step_matches_reference_to_1e6():
    # One step isolates the arithmetic from float32 accumulation over the chain.
    kept = sorted(space_timesteps(1000, "250"))
    d = create_diffusion("250")
    gen = torch.Generator().manual_seed(0)
    x, eps, v = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    v = v.clamp(-1, 1)
    for i in (0, 1, 137, 249):
        t = torch.full((2,), i)
        mean, log_var, _ = d.p_mean_variance(torch.cat([eps, v], 1).float(), x.float(), t)
        noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
        ours = mean + (i != 0) * torch.exp(0.5 * log_var) * noise.float()
        ref = ref_ddpm_step(i, x.numpy(), eps.numpy(), v.numpy(), kept, True, noise.numpy())
        assert rel(ours.numpy(), ref) < 1e-6


def test_fixed_variance_models_match_reference():
    ours, ref = _run_and_reference(SamplerConfig(num_steps=25, guidance_scale=1.0), learn_sigma=False)
    assert rel(ours, ref) < 1e-6


# ------------------------------------------------------------------------------------------------ guidance

def test_guidance_touches_exactly_the_official_three_channels():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(4, 8, 2, 2, generator=gen)  # doubled batch of 2, 4 latent channels, learned sigma
    guided = apply_guidance(out, 4.0, guide_channels=Sampler(SamplerConfig(), 4, 1000).guide_channels)
    cond, uncond = out[:2], out[2:]
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(guided[:, 3:], cond[:, 3:])  # channel 3 and the variance: conditional, unguided


def test_guidance_all_latent_channels_with_the_option():
    out = torch.randn(4, 8, 2, 2)
    g = Sampler(SamplerConfig(guide_all_channels=True), 4, 1000).guide_channels
    assert g == 4
    guided = apply_guidance(out, 2.5, g)
    cond, uncond = out[:2], out[2:]
    torch.testing.assert_close(guided[:, :4], uncond[:, :4] + 2.5 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(guided[:, 4:], cond[:, 4:])


def test_guided_model_sees_doubled_batch_with_null_labels_and_original_timesteps():
    seen = []

    def recording_model(x, t, y):
        seen.append((x.shape[0], t.clone(), y.clone()))
        return toy_model(x, t, y)

    sampler = Sampler(SamplerConfig(num_steps=4), in_channels=1, num_classes=10)
    sampler.sample(recording_model, torch.tensor([3, 7]), seed=0, input_size=4)
    assert [s[0] for s in seen] == [4] * 4
    assert seen[0][2].tolist() == [3, 7, 10, 10]
    assert [int(s[1][0]) for s in seen] == sorted(space_timesteps(1000, "4"), reverse=True)
    assert all(s[1].dtype == torch.int64 and s[2].dtype == torch.int64 for s in seen)


# ---------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_samples_different_seed_different():
    model = create_model("DiT-tiny/2", seed=0)
    sampler = Sampler(SamplerConfig(num_steps=5), in_channels=4, num_classes=10)
    labels = torch.tensor([1, 2])
    a = sampler.sample(model, labels, seed=11, input_size=8)
    b = sampler.sample(model, labels, seed=11, input_size=8)
    c = sampler.sample(model, labels, seed=12, input_size=8)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_training_loss_terms():
    d = create_diffusion("")
    model = create_model("DiT-digits", seed=0)  # eval mode: no label dropout, so the terms are reproducible
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 1, 2, 3])
    noise = torch.randn_like(x0)
    terms = d.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (4,)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    eps = model(d.q_sample(x0, t, noise), t, y)[:, :1]
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] > 0).all()


def test_vb_term_gradient_reaches_only_the_variance_channels():
    d = create_diffusion("")
    out = torch.randn(2, 2, 4, 4, requires_grad=True)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    terms = d.training_losses(lambda x, t: out, x0, torch.tensor([3, 600]), noise=torch.randn(2, 1, 4, 4))
    terms["vb"].sum().backward()
    assert out.grad[:, 0].abs().sum() == 0 and out.grad[:, 1].abs().sum() > 0


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="unknown sampling method"):
        Sampler(SamplerConfig(method="euler"), 1, 10)
    with pytest.raises(ValueError, match="steps must be between"):
        Sampler(SamplerConfig(num_steps=0), 1, 10)


# ----------------------------------------------------------------------------- variational bound (float64)

# float32 against float64: at most 2.2e-6 relative where the term is above 1e-2 bits; a KL of 1e-4 bits or less
# (t near 999) is a difference of nearly equal float32 numbers, hence the 1e-7-bit floor. Bits vs nats is 44 %.
VB_FLOAT32 = dict(rtol=5e-6, atol=1e-7)


def ref_vb_bits(out, x0, x_t, t):
    """The official vb term per sample in bits, from the definitions in float64: KL(q(x_{t-1}|x_t,x_0) ||
    p(x_{t-1}|x_t)) for t > 0, the discretised-Gaussian decoder NLL for t == 0, each a mean over pixels / ln 2."""
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    log_post_var = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    out, x0, x_t = (a.detach().double().numpy() for a in (out, x0, x_t))
    C = x0.shape[1]
    bits = []
    for i, s in enumerate(t.tolist()):
        def posterior_mean(start):
            return (betas[s] * math.sqrt(abar_prev[s]) / (1 - abar[s]) * start
                    + (1 - abar_prev[s]) * math.sqrt(1 - betas[s]) / (1 - abar[s]) * x_t[i])

        eps, frac = out[i, :C], (out[i, C:] + 1) / 2
        log_var = frac * math.log(betas[s]) + (1 - frac) * log_post_var[s]
        mean = posterior_mean((x_t[i] - math.sqrt(1 - abar[s]) * eps) / math.sqrt(abar[s]))
        if s > 0:
            true_log_var = log_post_var[s]
            nats = 0.5 * (-1 + log_var - true_log_var + np.exp(true_log_var - log_var)
                          + (posterior_mean(x0[i]) - mean) ** 2 * np.exp(-log_var))
        else:
            def cdf(z):  # the official tanh approximation of the standard normal CDF
                return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

            sd = np.exp(0.5 * log_var)
            upper, lower = cdf((x0[i] - mean + 1 / 255) / sd), cdf((x0[i] - mean - 1 / 255) / sd)
            log_p = np.where(x0[i] < -0.999, np.log(upper),
                             np.where(x0[i] > 0.999, np.log(1 - lower), np.log(upper - lower)))
            nats = -log_p
        bits.append(nats.mean() / math.log(2))
    return torch.tensor(bits, dtype=torch.float64)


def digits_batch(n, seed):
    """Pixels in [-1, 1] with some exactly at the ends (as real images have), labels, noise."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    x0[:, :, 0] = -1.0
    x0[:, :, -1, :4] = 1.0
    return x0, torch.randint(0, 10, (n,), generator=gen), torch.randn(n, 1, 8, 8, generator=gen)


def test_training_loss_vb_equals_the_float64_bound_in_bits():
    from ditexport.zoo import load_builtin

    d = create_diffusion("")
    model = load_builtin("digits").eval()  # trained: its variance output is meaningful, not noise
    x0, y, noise = digits_batch(6, seed=3)
    t = torch.tensor([0, 0, 1, 10, 500, 999])
    seen = []

    def observed(x, s, **kwargs):
        seen.append((x, model(x, s, **kwargs)))
        return seen[-1][1]

    with torch.no_grad():
        terms = d.training_losses(observed, x0, t, noise=noise, model_kwargs={"y": y})
    (x_t, out), = seen
    torch.testing.assert_close(x_t.double(), ref_q_sample(x0, t, noise), rtol=1e-6, atol=1e-6)
    expected = ref_vb_bits(out, x0, x_t, t)
    torch.testing.assert_close(terms["vb"].double(), expected, **VB_FLOAT32)
    torch.testing.assert_close(terms["loss"].double(), terms["mse"].double() + expected, **VB_FLOAT32)


def ref_q_sample(x0, t, noise):
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)], dtype=np.float64)
    abar = torch.from_numpy(np.cumprod(1 - betas))[t].reshape(-1, 1, 1, 1)
    return abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()


@pytest.mark.parametrize("steps", [[0, 0, 0], [1, 37, 999]], ids=["t=0", "t>0"])
def test_vb_terms_bpd_equal_the_float64_formulas(steps):
    d = create_diffusion("")
    x0, _, noise = digits_batch(3, seed=5)
    t = torch.tensor(steps)
    x_t = d.q_sample(x0, t, noise)
    gen = torch.Generator().manual_seed(9)
    # An epsilon close to the true noise (as a trained model's) and variance values across [-1, 1].
    out = torch.cat([noise + 0.05 * torch.randn(noise.shape, generator=gen),
                     torch.rand(noise.shape, generator=gen) * 2 - 1], dim=1)
    torch.testing.assert_close(d._vb_terms_bpd(out, x0, x_t, t).double(), ref_vb_bits(out, x0, x_t, t),
                               **VB_FLOAT32)
