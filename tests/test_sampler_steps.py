"""The sampler's one step function: shared steps (`Sampler.run`) and per-sample columns give the same bits."""
import pytest
import torch

from ditexport.diffusion import create_diffusion
from ditexport.sampler import Sampler, SamplerConfig, apply_guidance, denoise_step
from ditexport.zoo import load_builtin

CASES = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmpp-2m", 0.0)]


@pytest.fixture(scope="module")
def digits(one_torch_thread):
    return load_builtin("digits")


def run_with_columns(sampler: Sampler, model, x_T, labels, step_noise):
    """The chain with every coefficient a (B, 1, 1, 1) column, as the serving engine steps samples."""
    n = x_T.shape[0]
    k = sampler.step_coefficients(x_T.device)
    y = torch.cat([labels, torch.full_like(labels, sampler.null_class)]) if sampler.guided else labels
    x, x0_prev = x_T, torch.zeros_like(x_T)
    for i in range(sampler.num_steps):
        step = torch.full((n,), i, dtype=torch.int64)
        cols = {name: v[step].reshape(n, 1, 1, 1) for name, v in k.items() if name != "t"}
        x_in = torch.cat([x, x]) if sampler.guided else x
        out = model(x_in, k["t"][step].repeat(2 if sampler.guided else 1), y).float()
        if sampler.guided:
            out = apply_guidance(out, sampler.cfg.guidance_scale, sampler.guide_channels)
        last = i == sampler.num_steps - 1
        noise = None if (last or step_noise is None) else step_noise[i]
        x, x0_prev = denoise_step(sampler, cols, x, out, x0_prev, noise)
    return x


@pytest.mark.parametrize("method,eta", CASES)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_per_sample_columns_give_the_bits_of_the_shared_step(digits, method, eta, guidance):
    c = digits.config
    sampler = Sampler(SamplerConfig(num_steps=6, method=method, eta=eta, guidance_scale=guidance),
                      c.in_channels, c.num_classes, c.learn_sigma)
    labels = torch.tensor([0, 4, 9])
    x_T, step_noise = sampler.make_noise((3, c.in_channels, c.input_size, c.input_size), seed=11)
    shared = sampler.run(digits, x_T, labels, step_noise)
    columns = run_with_columns(sampler, digits, x_T, labels, step_noise)
    assert torch.isfinite(shared).all()
    assert torch.equal(shared, columns)


@pytest.mark.parametrize("learn_sigma,sigma_small", [(True, False), (False, False), (False, True)])
def test_one_step_ddpm_samples_instead_of_raising(learn_sigma, sigma_small):
    """A one-step respaced chain had no clipped log-variance (IndexError); its only step adds no noise."""
    d = create_diffusion("1", learn_sigma, sigma_small)
    assert d.num_timesteps == 1 and d.posterior_log_variance_clipped.shape == (1,)
    assert torch.isfinite(torch.tensor(d.fixed_log_variance)).all()
    sampler = Sampler(SamplerConfig(num_steps=1, guidance_scale=1.0), 2, 3, learn_sigma, sigma_small)
    model = lambda x, t, y: torch.cat([0.5 * x, torch.zeros_like(x)], 1) if learn_sigma else 0.5 * x
    x_T, step_noise = sampler.make_noise((2, 2, 4, 4), seed=3)
    x0 = sampler.run(model, x_T, torch.tensor([0, 1]), step_noise)
    # One step from t = 999 returns the posterior mean at t = 0, which is the x0 prediction itself.
    k = sampler.step_coefficients("cpu")
    assert torch.equal(x0, k["coef1"][0] * (k["sqrt_recip_ac"][0] * x_T - k["sqrt_recipm1_ac"][0] * 0.5 * x_T)
                       + k["coef2"][0] * x_T)


def test_one_step_sample_command_writes_an_image(tmp_path):
    from ditexport.cli import main

    out = tmp_path / "one.png"
    assert main(["sample", "--model", "digits", "--steps", "1", "--classes", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
