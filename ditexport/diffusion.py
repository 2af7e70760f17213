"""Gaussian diffusion as DiT uses it: linear betas, respacing, DDPM/DDIM/DPM-Solver++ sampling, guidance, loss.

The arithmetic follows the official `facebookresearch/DiT` `diffusion/` package (itself from OpenAI's
improved-diffusion): coefficients in float64 numpy, taken per step as float32 on the model's device.
DPM-Solver++ (2M) follows Lu et al. 2022 with the step schedule of diffusers' `DPMSolverMultistepScheduler`.
The sampler drives any callable `model(x, t, y) -> out`; it knows nothing of runtimes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError

#################################################################################
#                          Schedules and respacing                              #
#################################################################################


def linear_betas(num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """The linear schedule of Ho et al., scaled so any step count spans the same noise range."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Which of the original steps to keep; "250" spreads 250 steps evenly, "ddim50" keeps a fixed stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise UsageError(f"cannot create exactly {desired_count} steps with an integer stride over {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise UsageError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


#################################################################################
#                             Gaussian diffusion                                #
#################################################################################


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL divergence between two Gaussians, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 8 bits under a Gaussian."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] as float32 on t's device, shaped to broadcast over a batch of `ndim` dims (official semantics)."""
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    return res.reshape(-1, *([1] * (ndim - 1)))


def _mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """Diffusion over a (possibly respaced) beta schedule; `timestep_map[i]` is step i's original timestep."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, sigma_small: bool = False,
                 timestep_map: list[int] | None = None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(len(betas)), np.int64)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the start of the chain, so its log is clipped to the next value.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Fixed variances for models without learned sigma: "large" is beta_t (with the first step's
        # posterior variance), "small" the clipped posterior variance.
        if sigma_small:
            self.fixed_variance = self.posterior_variance
            self.fixed_log_variance = self.posterior_log_variance_clipped
        else:
            self.fixed_variance = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_log_variance = np.log(self.fixed_variance)

    # -- forward process -----------------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t.ndim), \
            _extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    # -- reverse process -----------------------------------------------------------------------

    def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
        """Mean, log-variance and x0 prediction from a model output (epsilon, [variance values])."""
        C = x.shape[1]
        if self.learn_sigma:
            eps, model_var_values = model_output[:, :C], model_output[:, C:2 * C]
            min_log = _extract(self.posterior_log_variance_clipped, t, x.ndim)
            max_log = _extract(np.log(self.betas), t, x.ndim)
            frac = (model_var_values + 1) / 2  # the model outputs [-1, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            model_log_variance = _extract(self.fixed_log_variance, t, x.ndim).expand_as(x)
        pred_xstart = (_extract(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x
                       - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.ndim) * eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return model_mean, model_log_variance, pred_xstart

    # -- training ------------------------------------------------------------------------------

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Epsilon MSE plus, for a learned variance, the variational-bound term (official "mse + vb")."""
        model_kwargs = model_kwargs or {}
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self._map(t), **model_kwargs)
        C = x_t.shape[1]
        terms = {}
        if self.learn_sigma:
            # The vb term trains only the variance: the mean's gradient is stopped, as officially.
            eps, var_values = model_output[:, :C], model_output[:, C:]
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            eps = model_output
        terms["mse"] = _mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance_clipped, mean, log_variance)) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=0.5 * log_variance)
        decoder_nll = _mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def _map(self, t):
        return torch.from_numpy(self.timestep_map).to(t.device)[t]


def create_diffusion(timestep_respacing: str = "", learn_sigma: bool = True, sigma_small: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The official factory: linear betas over `diffusion_steps`, respaced by `timestep_respacing`."""
    betas = linear_betas(diffusion_steps)
    use_timesteps = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
    # Respacing recomputes betas over the kept steps so that alpha-bar at each kept step is unchanged.
    base = GaussianDiffusion(betas, learn_sigma, sigma_small)
    last_alpha_cumprod = 1.0
    new_betas, timestep_map = [], []
    for i, alpha_cumprod in enumerate(base.alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return GaussianDiffusion(np.array(new_betas), learn_sigma, sigma_small, timestep_map)


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


#################################################################################
#                         Sampling with guidance                                #
#################################################################################


def apply_guidance(model_output, scale: float, guide_channels: int):
    """Classifier-free guidance on a doubled batch [cond; uncond] -> guided output for the first half.

    As the official `forward_with_cfg`, only the first `guide_channels` channels are guided; the rest
    (e.g. the learned variance) are taken from the conditional half.
    """
    cond, uncond = model_output.chunk(2, dim=0)
    g = guide_channels
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


def official_guide_channels(in_channels: int) -> int:
    """The official code guides 3 of the 4 latent channels (for reproducibility of its FID numbers)."""
    return min(3, in_channels)


SAMPLING_METHODS = ("ddpm", "ddim", "dpmpp-2m")


@dataclass
class SamplerConfig:
    """What to sample with; defaults are the official `sample.py` settings."""
    num_steps: int = 250
    method: str = "ddpm"             # "ddpm" (ancestral, learned/fixed variance), "ddim" or "dpmpp-2m" (DPM-Solver++)
    guidance_scale: float = 4.0      # 1.0 disables guidance (no doubled batch)
    eta: float = 0.0                 # DDIM stochasticity
    guide_all_channels: bool = False  # official guides 3 latent channels; diffusers guides all
    clip_denoised: bool = False      # official sample.py does not clip latents
    respacing: str | None = None     # ddpm/ddim: overrides str(num_steps), e.g. "ddim50"

    def __post_init__(self):
        # NaN or inf here would run the whole chain and end in black images; refuse them where every caller
        # (CLI, Python API, demo) passes.
        for name in ("guidance_scale", "eta"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise SamplerConfigError(name, f"{name} must be a finite number, got {value!r}")


class SamplerConfigError(UsageError):
    """A sampler setting that cannot be sampled with; `field` names the SamplerConfig field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Sampler:
    """DDPM / DDIM / DPM-Solver++ (2M) with classifier-free guidance over any `model(x, t, y)`.

    Coefficients are precomputed once on the model's device; every step stays there, so a step issues
    no host synchronisation. All noise comes from one seeded CPU generator.
    """

    def __init__(self, cfg: SamplerConfig, in_channels: int, num_classes: int, learn_sigma: bool = True,
                 sigma_small: bool = False, diffusion_steps: int = 1000):
        if cfg.method not in SAMPLING_METHODS:
            raise UsageError(f"unknown sampling method {cfg.method!r}; use {', '.join(map(repr, SAMPLING_METHODS))}")
        if cfg.num_steps < 1 or cfg.num_steps > diffusion_steps:
            raise UsageError(f"steps must be between 1 and {diffusion_steps}, got {cfg.num_steps}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.null_class = num_classes
        if cfg.method == "dpmpp-2m":
            if cfg.respacing:
                raise UsageError("respacing applies to ddpm and ddim; dpmpp-2m spaces its steps linearly")
            if cfg.num_steps >= diffusion_steps:  # the rounded linear spacing would repeat a timestep
                raise UsageError(f"dpmpp-2m takes at most {diffusion_steps - 1} steps, got {cfg.num_steps}")
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
        stochastic = self.cfg.method == "ddpm" or (self.cfg.method == "ddim" and self.cfg.eta > 0)
        steps = torch.randn((self.num_steps, *shape), generator=gen) if stochastic else None
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

    @torch.no_grad()
    def run(self, model, x_T: torch.Tensor, labels: torch.Tensor, step_noise: torch.Tensor | None,
            progress=None) -> torch.Tensor:
        """The reverse chain from given initial and per-step noise; see `sample`."""
        cfg, d = self.cfg, self.diffusion
        device = x_T.device
        n, C = x_T.shape[:2]
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
            t = k["t"][i].expand(batch)
            x_in = torch.cat([x, x]) if self.guided else x
            out = model(x_in, t, y).float()
            if self.guided:
                out = apply_guidance(out, cfg.guidance_scale, self.guide_channels)
            eps = out[:, :C]  # learned-sigma models: the variance channels are not epsilon
            x0 = k["sqrt_recip_ac"][i] * x - k["sqrt_recipm1_ac"][i] * eps
            if cfg.clip_denoised:
                x0 = x0.clamp(-1, 1)
            last = i == self.num_steps - 1  # the final step (original t = 0) adds no noise
            if cfg.method == "dpmpp-2m":
                x = k["ratio"][i] * x + k["c_now"][i] * x0 + k["c_prev"][i] * x0_prev
                x0_prev = x0
            elif cfg.method == "ddpm":
                if d.learn_sigma:
                    frac = (out[:, C:2 * C] + 1) / 2
                    log_var = frac * k["max_log"][i] + (1 - frac) * k["min_log"][i]
                else:
                    log_var = k["fixed_log"][i]
                mean = k["coef1"][i] * x0 + k["coef2"][i] * x
                x = mean if last else mean + torch.exp(0.5 * log_var) * step_noise[i]
            else:
                # DDIM (Song et al.): epsilon re-derived from the (possibly clipped) x0, as officially.
                eps = (k["sqrt_recip_ac"][i] * x - x0) / k["sqrt_recipm1_ac"][i]
                ab, ab_prev = k["ac"][i], k["ac_prev"][i]
                sigma = cfg.eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
                mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
                x = mean if (last or step_noise is None) else mean + sigma * step_noise[i]
        return x
