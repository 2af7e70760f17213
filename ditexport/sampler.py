"""DDPM / DDIM / DPM-Solver++ (2M) sampling with classifier-free guidance over any `model(x, t, y)`.

Coefficients are float64 numpy (see `ditexport.diffusion`), taken per step as float32 on the model's device.
DPM-Solver++ (2M) follows Lu et al. 2022 with the step schedule of diffusers' `DPMSolverMultistepScheduler`.
One function, `denoise_step`, computes a step from that step's coefficients: 0-d tensors when every sample is
at the same step (`Sampler.run`), or (B, 1, 1, 1) columns when each sample is at its own (the serving engine).
The sampler knows nothing of runtimes.
"""
from __future__ import annotations

import numpy as np
import torch

from .diffusion import create_diffusion
from .settings import SAMPLING_METHODS, SamplerConfig, SamplerConfigError  # noqa: F401  (re-exported)


def dpm_solver_timesteps(num_steps: int, diffusion_steps: int = 1000) -> np.ndarray:
    """Original-scale timesteps in the order they run, as diffusers' `timestep_spacing="linspace"`:
    num_steps + 1 points rounded (half to even) from 0 to T-1, the last (t = 0) dropped."""
    return np.linspace(0, diffusion_steps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def dpm_solver_2m_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step float64 coefficients of DPM-Solver++ (2M), the data-prediction multistep solver (Lu et al. 2022).

    Step i predicts x0 from x and epsilon, then x <- ratio * x + c_now * x0 + c_prev * x0 of step i-1.
    In log-SNR lambda = log(alpha / sigma) with h = lambda_next - lambda_i and r = h_previous / h:
    ratio = sigma_next / sigma_i, phi = alpha_next (1 - e^-h); second order (midpoint) has c_now = phi (1 + 1/2r),
    c_prev = -phi / 2r. As diffusers' defaults: first order at the first step (no previous x0) and at the
    final step, which goes to sigma = 0 (`final_sigmas_type="zero"`), so the last step returns its x0.
    """
    abar = alphas_cumprod[timesteps]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    alpha_next, sigma_next = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0)
    lam = np.log(alpha) - np.log(sigma)
    h = np.append(lam[1:], np.inf) - lam  # infinite at the final step: e^-h = 0 there
    phi = alpha_next * -np.expm1(-h)
    h_prev = np.diff(lam, prepend=np.nan)  # lambda_i - lambda_(i-1); none before the first step
    step = np.arange(len(timesteps))
    second_order = (step > 0) & (step < len(timesteps) - 1)
    half_over_r = np.where(second_order, 0.5 * h / h_prev, 0.0)
    return {"sqrt_recip_ac": 1.0 / alpha, "sqrt_recipm1_ac": sigma / alpha, "ratio": sigma_next / sigma,
            "c_now": phi * (1.0 + half_over_r), "c_prev": -phi * half_over_r}




def apply_guidance(model_output, scale: float, guide_channels: int):
    """Classifier-free guidance on a doubled batch [cond; uncond] -> guided output for the first half.

    As the official `forward_with_cfg`, only the first `guide_channels` channels are guided; the rest
    (e.g. the learned variance) are taken from the conditional half.
    """
    cond, uncond = model_output.chunk(2, dim=0)
    return guide(cond, uncond, scale, guide_channels)


def guide(cond, uncond, scale, guide_channels: int):
    """The guided output from the conditional and unconditional outputs of the same samples; `scale` is a number
    or a (B, 1, 1, 1) column, one scale per sample (the same elementwise arithmetic either way)."""
    g = guide_channels
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


def official_guide_channels(in_channels: int) -> int:
    """The official code guides 3 of the 4 latent channels (for reproducibility of its FID numbers)."""
    return min(3, in_channels)


class Sampler:
    """DDPM / DDIM / DPM-Solver++ (2M) with classifier-free guidance over any `model(x, t, y)`.

    Coefficients are precomputed once on the model's device; every step stays there, so a step issues
    no host synchronisation. All noise comes from one seeded CPU generator.
    """

    def __init__(self, cfg: SamplerConfig, in_channels: int, num_classes: int, learn_sigma: bool = True,
                 sigma_small: bool = False, diffusion_steps: int = 1000):
        if cfg.method not in SAMPLING_METHODS:
            raise SamplerConfigError("method", f"unknown sampling method {cfg.method!r}; use "
                                               f"{', '.join(map(repr, SAMPLING_METHODS))}")
        if cfg.num_steps < 1 or cfg.num_steps > diffusion_steps:
            raise SamplerConfigError("num_steps", f"steps must be between 1 and {diffusion_steps}, "
                                                  f"got {cfg.num_steps}")
        if not 0.0 <= cfg.eta <= 1.0:  # above 1, DDIM's noise outgrows its step and the chain turns NaN
            raise SamplerConfigError("eta", f"eta must be between 0 and 1 (DDIM), got {cfg.eta!r}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.null_class = num_classes
        if cfg.method == "dpmpp-2m":
            if cfg.respacing:
                raise SamplerConfigError("respacing", "respacing applies to ddpm and ddim; dpmpp-2m spaces its steps "
                                                        "linearly")
            if cfg.num_steps >= diffusion_steps:  # the rounded linear spacing would repeat a timestep
                raise SamplerConfigError("num_steps", f"dpmpp-2m takes at most {diffusion_steps - 1} steps, "
                                                        f"got {cfg.num_steps}")
            # The solver reads alpha-bar at its own timesteps off the full schedule.
            self.diffusion = create_diffusion("", learn_sigma, sigma_small, diffusion_steps)
            self.timesteps = dpm_solver_timesteps(cfg.num_steps, diffusion_steps)
        else:
            self.diffusion = create_diffusion(cfg.respacing or str(cfg.num_steps), learn_sigma, sigma_small,
                                              diffusion_steps)
            self.timesteps = self.diffusion.timestep_map[::-1].copy()
        self.guide_channels = in_channels if cfg.guide_all_channels else official_guide_channels(in_channels)

    @property
    def guided(self) -> bool:
        return self.cfg.guidance_scale != 1.0

    @property
    def num_steps(self) -> int:
        """Model evaluations per sample (times two rows when guided)."""
        return len(self.timesteps)

    def make_noise(self, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Initial noise and one noise tensor per step from one CPU generator (None where no step is stochastic)."""
        gen = torch.Generator().manual_seed(seed)
        x_T = torch.randn(shape, generator=gen)
        steps = torch.randn((self.num_steps, *shape), generator=gen) if self.stochastic() else None
        return x_T, steps

    def _coefficients(self, device):
        """Per-step float32 coefficients, in the order the steps run, and the original-scale timesteps."""
        d = self.diffusion
        if self.cfg.method == "dpmpp-2m":
            names = dpm_solver_2m_coefficients(d.alphas_cumprod, self.timesteps)
        else:
            order = np.arange(d.num_timesteps)[::-1].copy()  # T-1 ... 0 of the respaced chain
            names = {
                "sqrt_recip_ac": d.sqrt_recip_alphas_cumprod, "sqrt_recipm1_ac": d.sqrt_recipm1_alphas_cumprod,
                "coef1": d.posterior_mean_coef1, "coef2": d.posterior_mean_coef2,
                "min_log": d.posterior_log_variance_clipped, "max_log": np.log(d.betas),
                "fixed_log": d.fixed_log_variance, "ac": d.alphas_cumprod, "ac_prev": d.alphas_cumprod_prev,
            }
            names = {k: v[order] for k, v in names.items()}
        out = {k: torch.from_numpy(v).float().to(device) for k, v in names.items()}
        out["t"] = torch.from_numpy(self.timesteps).to(device)
        return out

    def sample(self, model, labels: torch.Tensor, seed: int, input_size: int, device="cpu",
               progress=None) -> torch.Tensor:
        """Draws noise from `seed` and runs the reverse chain; returns x0 (N, C, H, W), float32 on `device`.

        `model(x, t, y)` gets float32 x, int64 original-scale t and int64 y, all on `device`;
        `progress` wraps the step iterator (e.g. tqdm).
        """
        x_T, step_noise = self.make_noise((len(labels), self.in_channels, input_size, input_size), seed)
        return self.run(model, x_T.to(device), labels, step_noise, progress)

    def stochastic(self) -> bool:
        """Whether steps draw noise (ddpm, or ddim with eta > 0)."""
        return self.cfg.method == "ddpm" or (self.cfg.method == "ddim" and self.cfg.eta > 0)

    def step_coefficients(self, device) -> dict[str, torch.Tensor]:
        """Per-step float32 coefficients (index i = the i-th step run) and original-scale timesteps `t`."""
        return self._coefficients(device)

    @torch.no_grad()
    def run(self, model, x_T: torch.Tensor, labels: torch.Tensor, step_noise: torch.Tensor | None,
            progress=None) -> torch.Tensor:
        """The reverse chain from given initial and per-step noise; see `sample`."""
        cfg = self.cfg
        device = x_T.device
        k = self._coefficients(device)
        y = labels.to(device=device, dtype=torch.int64)
        if self.guided:
            y = torch.cat([y, torch.full_like(y, self.null_class)])
        batch = y.shape[0]
        if step_noise is not None:
            step_noise = step_noise.to(device, non_blocking=True)
        x = x_T
        x0_prev = torch.zeros_like(x_T)  # DPM-Solver++: the previous step's x0 (weight 0 at the first step)
        steps = range(self.num_steps)
        for i in (progress(steps) if progress else steps):
            x_in = torch.cat([x, x]) if self.guided else x
            out = model(x_in, k["t"][i].expand(batch), y).float()
            if self.guided:
                out = apply_guidance(out, cfg.guidance_scale, self.guide_channels)
            last = i == self.num_steps - 1  # the final step (original t = 0) adds no noise
            noise = None if (last or step_noise is None) else step_noise[i]
            x, x0_prev = denoise_step(self, {name: v[i] for name, v in k.items()}, x, out, x0_prev, noise)
        return x


def denoise_step(sampler: Sampler, k: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                 x0_prev: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step -> (next x, this step's x0), from the (guided) model output and this step's coefficients.

    `k` holds 0-d tensors (all samples at one step) or (B, 1, 1, 1) columns (each sample at its own step); the
    same elementwise operations run either way. `noise` is None where the step adds none (the final step).
    """
    cfg, C = sampler.cfg, x.shape[1]
    eps = out[:, :C]  # learned-sigma models: the variance channels are not epsilon
    x0 = k["sqrt_recip_ac"] * x - k["sqrt_recipm1_ac"] * eps
    if cfg.clip_denoised:
        x0 = x0.clamp(-1, 1)
    if cfg.method == "dpmpp-2m":
        return k["ratio"] * x + k["c_now"] * x0 + k["c_prev"] * x0_prev, x0
    if cfg.method == "ddpm":
        if sampler.diffusion.learn_sigma:
            frac = (out[:, C:2 * C] + 1) / 2
            log_var = frac * k["max_log"] + (1 - frac) * k["min_log"]
        else:
            log_var = k["fixed_log"]
        mean = k["coef1"] * x0 + k["coef2"] * x
        return (mean if noise is None else mean + torch.exp(0.5 * log_var) * noise), x0
    # DDIM (Song et al.): epsilon re-derived from the (possibly clipped) x0, as officially.
    eps = (k["sqrt_recip_ac"] * x - x0) / k["sqrt_recipm1_ac"]
    ab, ab_prev = k["ac"], k["ac_prev"]
    sigma = cfg.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
    return (mean if noise is None else mean + sigma * noise), x0
