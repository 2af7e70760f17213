"""DPM-Solver++ (2M): parity with diffusers' `DPMSolverMultistepScheduler` on real DiTs, and the solver's contract."""
import numpy as np
import pytest
import torch

from ditexport.sampler import Sampler, SamplerConfig, dpm_solver_timesteps
from ditexport.model import create_model
from ditexport.zoo import load_builtin

TOLERANCE = 1e-5  # the bound on the relative error of the final samples

# diffusers' own set_timesteps trips numpy 2's __array__ deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------- the diffusers reference (independent)

def diffusers_samples(model, x_T, labels, num_steps, guidance_scale, guide_channels):
    """Samples with diffusers' scheduler as `DiTPipeline` drives it: guided epsilon channels into `scheduler.step`.

    Written without any of ditexport's sampling code: its own guidance (the first `guide_channels` channels
    guided, the rest conditional) and its own split of the epsilon channels from the learned variance.
    """
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                            beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(num_steps)
    n, channels = len(labels), x_T.shape[1]
    null = torch.full_like(labels, model.config.num_classes)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guidance_scale != 1.0:
                out = model(torch.cat([x, x]), t.repeat(2 * n), torch.cat([labels, null]))
                cond, uncond = out[:n, :channels], out[n:, :channels]
                g = guide_channels
                eps = torch.cat([uncond[:, :g] + guidance_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], 1)
            else:
                eps = model(x, t.repeat(n), labels)[:, :channels]
            x = scheduler.step(eps, t, x).prev_sample
    return x, scheduler.timesteps.numpy()


def ours_and_diffusers(model, num_steps, guidance_scale, labels, seed=0, guide_all_channels=False):
    cfg = model.config
    sampler = Sampler(SamplerConfig(num_steps=num_steps, method="dpmpp-2m", guidance_scale=guidance_scale,
                                    guide_all_channels=guide_all_channels),
                      cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = torch.tensor(labels)
    x_T, step_noise = sampler.make_noise((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), seed)
    assert step_noise is None  # deterministic after the initial noise
    ours = sampler.run(model, x_T, labels, step_noise)
    guide_channels = cfg.in_channels if guide_all_channels else min(3, cfg.in_channels)
    theirs, timesteps = diffusers_samples(model, x_T, labels, num_steps, guidance_scale, guide_channels)
    assert sampler.timesteps.tolist() == timesteps.tolist()
    return ours, theirs


@pytest.fixture(scope="module")
def digits():
    return load_builtin("digits")


@pytest.fixture(scope="module")
def dit_s2():
    # DiT-S/2 with random non-zero weights (4 latent channels, learned sigma, 1000 classes). At 256 px a guided
    # forward takes ~0.3 s on the 2 shared cores, so the full grid runs at 64 px (8x8 latents); the same network
    # at 256 px is checked once below.
    return create_model("DiT-S/2", seed=0, input_size=8)


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("num_steps", [10, 20, 25])
def test_digits_model_matches_diffusers(one_torch_thread, digits, num_steps, guidance_scale):
    ours, theirs = ours_and_diffusers(digits, num_steps, guidance_scale, labels=[0, 3, 8, 9])
    print(f"digits, {num_steps} steps, guidance {guidance_scale}: rel. error {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("num_steps", [10, 20, 25])
def test_dit_s2_random_weights_matches_diffusers(one_torch_thread, dit_s2, num_steps, guidance_scale):
    ours, theirs = ours_and_diffusers(dit_s2, num_steps, guidance_scale, labels=[207, 360])
    print(f"DiT-S/2 64 px, {num_steps} steps, guidance {guidance_scale}: rel. error {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) <= TOLERANCE


def test_dit_s2_guiding_all_channels_matches_diffusers(one_torch_thread, dit_s2):
    ours, theirs = ours_and_diffusers(dit_s2, 20, 4.0, labels=[1, 2], guide_all_channels=True)
    official, _ = ours_and_diffusers(dit_s2, 20, 4.0, labels=[1, 2])
    assert rel(ours, theirs) <= TOLERANCE
    assert rel(official, ours) > 1e-3  # the option changes the samples: channel 3 is guided too


@pytest.mark.slow
def test_dit_s2_at_256_px_matches_diffusers(one_torch_thread):
    ours, theirs = ours_and_diffusers(create_model("DiT-S/2", seed=0), 10, 4.0, labels=[207])
    print(f"DiT-S/2 256 px, 10 steps, guidance 4: rel. error {rel(ours, theirs):.2e}")
    assert ours.shape == (1, 4, 32, 32) and rel(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("num_steps", [1, 2, 3, 50])
def test_edge_step_counts_match_diffusers(one_torch_thread, digits, num_steps):
    # 1 and 2 steps are first order only; 3 is first, second, first; 50 spans the whole schedule finely.
    ours, theirs = ours_and_diffusers(digits, num_steps, 4.0, labels=[5, 6])
    assert rel(ours, theirs) <= TOLERANCE


# --------------------------------------------------------------------------------------------- the contract

def test_timesteps_are_diffusers_linspace_spacing():
    assert dpm_solver_timesteps(20).tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450,
                                                 400, 350, 300, 250, 200, 150, 100, 50]
    assert dpm_solver_timesteps(1).tolist() == [999]
    assert dpm_solver_timesteps(999).tolist() == list(range(999, 0, -1))
    assert len(set(dpm_solver_timesteps(1000).tolist())) < 1000  # so the sampler stops at 999 steps


def toy_model(x, t, y):
    """A deterministic stand-in network with learned-sigma output (the input of the sampler, not under test)."""
    tt = t.float()[:, None, None, None] / 1000
    eps = torch.tanh(0.7 * x + 0.3 * tt + 0.05 * y.float()[:, None, None, None])
    return torch.cat([eps, torch.tanh(0.2 * x - 0.4 * tt)], dim=1)


def test_one_step_returns_the_x0_prediction_at_t_999():
    sampler = Sampler(SamplerConfig(num_steps=1, method="dpmpp-2m", guidance_scale=1.0), 1, 10)
    x_T, _ = sampler.make_noise((2, 1, 4, 4), seed=1)
    y = torch.tensor([2, 5])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[999]
    eps = toy_model(x_T, torch.full((2,), 999), y)[:, :1]
    expected = (x_T.double() - np.sqrt(1 - abar) * eps.double()) / np.sqrt(abar)
    assert rel(sampler.run(toy_model, x_T, y, None), expected) < 1e-6


def test_variance_channels_do_not_change_the_samples():
    def other_variance(x, t, y):
        out = toy_model(x, t, y)
        return torch.cat([out[:, :1], -out[:, 1:]], dim=1)

    sampler = Sampler(SamplerConfig(num_steps=6, method="dpmpp-2m"), 1, 10)
    x_T, _ = sampler.make_noise((2, 1, 4, 4), seed=0)
    y = torch.tensor([1, 2])
    assert torch.equal(sampler.run(toy_model, x_T, y, None), sampler.run(other_variance, x_T, y, None))


def test_initial_noise_is_the_ddpm_noise_and_no_step_noise_is_drawn():
    dpm = Sampler(SamplerConfig(num_steps=20, method="dpmpp-2m", eta=1.0), 1, 10)  # eta is DDIM's alone
    ddpm = Sampler(SamplerConfig(num_steps=20), 1, 10)
    x_dpm, noise_dpm = dpm.make_noise((3, 1, 4, 4), seed=7)
    x_ddpm, noise_ddpm = ddpm.make_noise((3, 1, 4, 4), seed=7)
    assert torch.equal(x_dpm, x_ddpm) and noise_dpm is None and noise_ddpm.shape == (20, 3, 1, 4, 4)
    a = dpm.sample(toy_model, torch.tensor([1, 2, 3]), seed=7, input_size=4)
    b = dpm.sample(toy_model, torch.tensor([1, 2, 3]), seed=7, input_size=4)
    c = dpm.sample(toy_model, torch.tensor([1, 2, 3]), seed=8, input_size=4)
    assert torch.equal(a, b) and (a - c).abs().mean() > 0.1
    assert dpm.num_steps == 20


def test_clip_denoised_clamps_each_x0_prediction():
    def loud(x, t, y):
        return 3 * toy_model(x, t, y)  # epsilon of 3x: x0 predictions well outside [-1, 1]

    labels = torch.tensor([1, 2])
    clipped = Sampler(SamplerConfig(num_steps=8, method="dpmpp-2m", clip_denoised=True), 1, 10)
    free = Sampler(SamplerConfig(num_steps=8, method="dpmpp-2m"), 1, 10)
    a = clipped.sample(loud, labels, seed=0, input_size=4)
    b = free.sample(loud, labels, seed=0, input_size=4)
    assert a.abs().max() <= 1.0 and b.abs().max() > 1.5  # the last step returns its x0 prediction


def test_respacing_and_repeated_timesteps_are_refused():
    with pytest.raises(ValueError, match="dpmpp-2m spaces its steps linearly"):
        Sampler(SamplerConfig(num_steps=10, method="dpmpp-2m", respacing="ddim10"), 1, 10)
    with pytest.raises(ValueError, match="at most 999 steps"):
        Sampler(SamplerConfig(num_steps=1000, method="dpmpp-2m"), 1, 10)
    assert Sampler(SamplerConfig(num_steps=999, method="dpmpp-2m"), 1, 10).num_steps == 999
