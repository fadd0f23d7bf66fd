"""Gaussian diffusion: forward process, posterior, model parameterisations, losses and the VLB.

Notation follows Ho et al. (2020) and Nichol & Dhariwal (2021): ``alpha_t = 1 - beta_t``,
``alpha_bar_t = prod_{s<=t} alpha_s``; timesteps are 0-based indices ``t in [0, T)``.
Every schedule array is float64 and is cast to the data's dtype only when indexed.

A *model function* is ``model_fn(x_t, t, y) -> output`` with ``x_t: (B, C, H, W)``, ``t: (B,)`` int64
in the **training** timestep index space (respacing maps it) and ``y: (B,)`` int64 labels or None.
Its output has ``C`` channels, or ``2C`` when ``variance == "learned_range"``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import make_betas

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("mse", "hybrid", "kl")

ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _choice(key: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{key}: unknown value {value!r}; choose from {', '.join(options)}")
    return value


class GaussianDiffusion:
    """Diffusion process over ``T`` steps with a chosen parameterisation, variance and loss.

    Args:
        schedule: ``linear`` or ``cosine`` (ignored when ``betas`` is given).
        num_timesteps: ``T``.
        prediction: what the network predicts: ``eps`` (noise), ``x0`` (clean image) or ``v``
            (``v = sqrt(ab) eps - sqrt(1 - ab) x0``, Salimans & Ho 2022).
        variance: ``fixed_small`` (posterior variance ``beta~_t``), ``fixed_large`` (``beta_t``) or
            ``learned_range`` (network's extra C channels ``v in [-1, 1]`` interpolate the log-variance
            between ``beta~_t`` and ``beta_t``).
        loss: ``mse`` (L_simple), ``hybrid`` (L_simple + vlb_weight * L_vlb, mean detached inside the
            VLB) or ``kl`` (L_vlb only).
        vlb_weight: lambda of the hybrid loss (improved-DDPM: 0.001).
        min_snr_gamma: if set, weight the mse term by min-SNR-gamma (Hang et al. 2023).
        betas: explicit float64 betas (used by respacing).
        timestep_map: original timestep index of each step (used by respacing).
    """

    def __init__(
        self,
        schedule: str = "cosine",
        num_timesteps: int = 1000,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss: str = "mse",
        vlb_weight: float = 0.001,
        min_snr_gamma: Optional[float] = None,
        betas: Optional[torch.Tensor] = None,
        timestep_map: Optional[torch.Tensor] = None,
    ):
        if betas is None and (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1):
            raise ValueError(f"scheduler.num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.schedule = schedule
        self.prediction = _choice("scheduler.prediction", prediction, PREDICTIONS)
        self.variance = _choice("scheduler.variance", variance, VARIANCES)
        self.loss_type = _choice("scheduler.loss", loss, LOSSES)
        if loss == "hybrid" and variance != "learned_range":
            raise ValueError(
                "scheduler.loss=hybrid trains the variance, so it needs scheduler.variance=learned_range "
                "(or use scheduler.loss=mse)"
            )
        if vlb_weight < 0:
            raise ValueError(f"scheduler.vlb_weight must be >= 0, got {vlb_weight}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"scheduler.min_snr_gamma must be positive or null, got {min_snr_gamma}")
        self.vlb_weight = float(vlb_weight)
        self.min_snr_gamma = min_snr_gamma

        if betas is None:
            betas = make_betas(schedule, num_timesteps)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = (
            torch.arange(self.num_timesteps, dtype=torch.long) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        )

        self._set_tables(betas)
        self._device_cache: dict = {}

    def _set_tables(self, betas: torch.Tensor) -> None:
        """Every float64 array indexed by ``t``: forward-process products, posterior and variances."""
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t), eq. 6-7 of Ho et al.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip its log to beta~_1 (improved-DDPM), which only affects the t = 0 decoder.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = torch.log(
                torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            )
        else:
            self.posterior_log_variance_clipped = torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # Every array that is indexed by t lives here, so the device cache below never sees a temporary.
        self.log_betas = torch.log(betas)
        # fixed_large: beta_t, with beta~_1 at t = 0 so the decoder's variance is sensible (improved-DDPM).
        self.fixed_large_variance = (
            torch.cat([self.posterior_variance[1:2], betas[1:]]) if self.num_timesteps > 1 else betas.clone()
        )
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ helpers
    def _extract(self, arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` broadcast to ``x``'s shape, gathered in float64 and cast to ``x.dtype``
        (float32 when ``x`` is half: schedules never live in half precision)."""
        # Keyed by identity and device; the source is kept with its copy so an id is never reused
        # for another array while its entry lives (only schedule attributes are passed here).
        key = (id(arr), str(t.device))
        entry = self._device_cache.get(key)
        if entry is None or entry[0] is not arr:
            dev_arr = arr.to(t.device) if t.device.type != "mps" else arr.float().to(t.device)
            entry = (arr, dev_arr)
            self._device_cache[key] = entry
        out = entry[1][t]
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return out.to(dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map step indices of this (possibly respaced) process to the training timestep indices."""
        return self.timestep_map.to(t.device)[t]

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I). Returns (mean, variance, log_variance)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._extract(self.one_minus_alphas_cumprod, t, x0)
        logvar = self._extract(self.log_one_minus_alphas_cumprod, t, x0)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps``, ``eps ~ N(0, I)``. Shapes (B, C, H, W)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * x0 + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0): returns (mean, variance, clipped log-variance)."""
        mean = self._extract(self.posterior_mean_coef1, t, x_t) * x0 + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        var = self._extract(self.posterior_variance, t, x_t)
        logvar = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, logvar

    # ------------------------------------------------------------------ parameterisations
    def predict_x0_from_eps(self, x_t, t, eps):
        return self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def predict_x0_from_v(self, x_t, t, v):
        return self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def get_v(self, x0, noise, t):
        """v-target: ``sqrt(ab_t) eps - sqrt(1 - ab_t) x_0``."""
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * noise - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def split_output(self, out: torch.Tensor, x_t: torch.Tensor):
        """Split a network output into (prediction, variance values or None)."""
        c = x_t.shape[1]
        if self.variance == "learned_range":
            if out.shape[1] != 2 * c:
                raise ValueError(
                    f"scheduler.variance=learned_range needs a model with {2 * c} output channels, got {out.shape[1]}"
                )
            return out[:, :c], out[:, c:]
        if out.shape[1] != c:
            raise ValueError(f"model output has {out.shape[1]} channels, expected {c} (scheduler.variance={self.variance})")
        return out, None

    def model_variance(self, var_values: Optional[torch.Tensor], x_t: torch.Tensor, t: torch.Tensor):
        """(variance, log_variance) of p(x_{t-1} | x_t)."""
        if self.variance == "learned_range":
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (var_values + 1.0) / 2.0
            logvar = frac * max_log + (1.0 - frac) * min_log
            return torch.exp(logvar), logvar
        if self.variance == "fixed_large":
            return self._extract(self.fixed_large_variance, t, x_t), self._extract(self.fixed_large_log_variance, t, x_t)
        logvar = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return self._extract(self.posterior_variance, t, x_t), logvar

    def output_to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Convert the network's prediction to (x0_hat, eps_hat)."""
        if self.prediction == "eps":
            eps = pred
            x0 = self.predict_x0_from_eps(x_t, t, eps)
        elif self.prediction == "x0":
            x0 = pred
            eps = self.predict_eps_from_x0(x_t, t, x0)
        else:
            x0 = self.predict_x0_from_v(x_t, t, pred)
            eps = self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + self._extract(self.sqrt_alphas_cumprod, t, x_t) * pred
        return x0, eps

    def p_mean_variance_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False):
        """p(x_{t-1} | x_t) from an already computed network output. Returns a dict with
        ``mean, variance, log_variance, pred_x0, pred_eps`` (all shaped like ``x_t``)."""
        pred, var_values = self.split_output(out, x_t)
        variance, log_variance = self.model_variance(var_values, x_t, t)
        x0, eps = self.output_to_x0_eps(pred, x_t, t)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(x_t, t, x0)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": x0, "pred_eps": eps}

    def p_mean_variance(self, model_fn: ModelFn, x_t, t, y=None, clip_x0: bool = False):
        """Call the network (with ``t`` mapped to training indices) and return p(x_{t-1} | x_t)."""
        out = model_fn(x_t, self.scale_timesteps(t), y)
        return self.p_mean_variance_from_output(out, x_t, t, clip_x0)

    # ------------------------------------------------------------------ losses
    def _snr(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._extract(self.snr, t, x)

    def _vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False):
        """L_{t} in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised Gaussian decoder NLL -log p(x_0 | x_1) at t = 0. Returns ((B,), pred_x0)."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_x0)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        # fixed variances are (B, 1, 1, 1): broadcast the decoder's scale to every pixel
        log_scales = (0.5 * p["log_variance"]).expand_as(x0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], log_scales)) / math.log(2.0)
        return torch.where(t == 0, nll, kl), p["pred_x0"]

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """Per-sample loss terms for ``x0: (B, C, H, W)`` in [-1, 1] at timesteps ``t: (B,)``.

        Returns a dict of ``(B,)`` tensors: ``loss`` (what is optimised), ``mse`` (always, unweighted
        error of the prediction target) and ``vb`` (L_t in bits/dim, when the loss uses the VLB).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, self.scale_timesteps(t), y)
        terms: dict = {}
        if self.loss_type == "kl":
            vb, _ = self._vb_terms_bpd(out, x0, x_t, t)
            terms["vb"] = vb
            terms["loss"] = vb * self.num_timesteps
            pred, _ = self.split_output(out, x_t)
            terms["mse"] = mean_flat((self._target(x0, noise, t) - pred.detach()) ** 2)
            return terms

        pred, var_values = self.split_output(out, x_t)
        target = self._target(x0, noise, t)
        mse = mean_flat((target.float() - pred.float()) ** 2)
        terms["mse"] = mse
        weighted = mse
        if self.min_snr_gamma is not None:
            snr = self._snr(t, x0).flatten()
            clipped = snr.clamp(max=self.min_snr_gamma)
            if self.prediction == "eps":
                w = clipped / snr
            elif self.prediction == "x0":
                w = clipped
            else:
                w = clipped / (snr + 1.0)
            weighted = mse * w
        loss = weighted
        if var_values is not None:
            # The VLB trains only the variance: the mean's gradient comes from L_simple (improved-DDPM).
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb, _ = self._vb_terms_bpd(frozen, x0, x_t, t)
            terms["vb"] = vb
            if self.loss_type == "hybrid":
                # L_vlb = T * E_t[L_t]; lambda * L_vlb with lambda = vlb_weight.
                loss = loss + self.vlb_weight * self.num_timesteps * vb
        terms["loss"] = loss
        return terms

    def _target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.get_v(x0, noise, t)

    # ------------------------------------------------------------------ likelihood evaluation
    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model_fn: ModelFn, x0: torch.Tensor, y=None, clip_x0: bool = False, progress: bool = False,
                      generator=None) -> dict:
        """Full variational bound for a batch ``x0`` in bits/dim (Ho et al. eq. 5):
        ``total = prior + sum_{t>0} L_t + L_0``. Returns a dict of ``(B,)`` tensors (``total_bpd``,
        ``prior_bpd``, ``decoder_bpd``, ``vb_sum``) and ``vb: (B, T)``. Costs T network calls.
        ``generator``: the forward-process noise source, a ``torch.Generator`` or a list of B (row
        ``b`` drawn from ``generator[b]``); None draws from the global RNG."""
        if isinstance(generator, (list, tuple)) and len(generator) != x0.shape[0]:
            raise ValueError(f"calc_bpd_loop: {len(generator)} generators for a batch of {x0.shape[0]}")
        b = x0.shape[0]
        vbs, mses = [], []
        steps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="bits/dim", leave=False)
        for i in steps:
            t = torch.full((b,), i, device=x0.device, dtype=torch.long)
            if generator is None:
                noise = torch.randn_like(x0)
            elif isinstance(generator, (list, tuple)):
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=x0.device, dtype=x0.dtype) for g in generator])
            else:
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            out = model_fn(x_t, self.scale_timesteps(t), y)
            vb, pred_x0 = self._vb_terms_bpd(out, x0, x_t, t, clip_x0)
            vbs.append(vb)
            mses.append(mean_flat((pred_x0 - x0) ** 2))
        vb = torch.stack(vbs[::-1], dim=1)  # (B, T), index t
        prior = self.prior_bpd(x0)
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "decoder_bpd": vb[:, 0],
            "vb_sum": vb[:, 1:].sum(dim=1),
            "vb": vb,
            "x0_mse": torch.stack(mses[::-1], dim=1),
        }

    # ------------------------------------------------------------------ respacing
    def respace(self, timesteps: Sequence[int]) -> "GaussianDiffusion":
        """A process over a subset of this one's timesteps, with betas recomputed from alpha-bar over
        the kept steps: ``beta'_i = 1 - ab[t_i] / ab[t_{i-1}]`` (``ab[t_{-1}] = 1``)."""
        kept = sorted(set(int(t) for t in timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps}), got {kept[:3]}..{kept[-3:]}")
        ab = self.alphas_cumprod[kept]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = 1.0 - ab / ab_prev
        return GaussianDiffusion(
            schedule=self.schedule,
            prediction=self.prediction,
            variance=self.variance,
            loss=self.loss_type,
            vlb_weight=self.vlb_weight,
            min_snr_gamma=self.min_snr_gamma,
            betas=betas,
            timestep_map=self.timestep_map[kept],
        )

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(schedule={self.schedule}, T={self.num_timesteps}, prediction={self.prediction}, "
            f"variance={self.variance}, loss={self.loss_type})"
        )
