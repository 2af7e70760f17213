"""Gaussian diffusion as DiT uses it: linear betas, respacing, posterior coefficients, the training loss.

The arithmetic follows the official `facebookresearch/DiT` `diffusion/` package (itself from OpenAI's
improved-diffusion): coefficients in float64 numpy. Sampling lives in `ditexport.sampler`.
"""
from __future__ import annotations

import math

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
        # A one-step chain has no next value; its only step is the final one, which adds no noise, so the
        # variance there is never drawn from and beta_0 (the "large" choice) stands in.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.log(betas)
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Fixed variances for models without learned sigma: "large" is beta_t (with the first step's
        # posterior variance), "small" the clipped posterior variance.
        if sigma_small:
            self.fixed_variance = self.posterior_variance
            self.fixed_log_variance = self.posterior_log_variance_clipped
        else:
            self.fixed_variance = (np.append(self.posterior_variance[1], betas[1:])
                                   if len(betas) > 1 else betas.copy())
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
