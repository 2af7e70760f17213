"""Training the built-in digits DiT with DiT's own recipe, sized for a few minutes on two CPU cores.

The recipe of the official `train.py`: `create_diffusion("")` (1000 linear steps), uniform t, the
`training_losses` of a learned-range variance (epsilon MSE + vb), class dropout through the model's
training mode, AdamW without weight decay, and an EMA of the weights, which is what ships.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..artifacts import atomic_path, atomic_write_json
from ..model import DiT, get_config
from ..settings import DigitsTrainConfig  # noqa: F401  (re-exported; declared with every default)

BUILTIN_DIR = Path(__file__).parent / "digits"  # the shipped weights: replaced only on explicit request
RUNS_DIR = Path("runs")                         # default home of new runs, under the working directory


def new_run_dir(root: str | Path = RUNS_DIR) -> Path:
    """`runs/digits-<date>-<time>`, not yet existing (a suffix keeps two runs of one second apart)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / f"digits-{stamp}", 1
    while path.exists():
        path, n = Path(root) / f"digits-{stamp}-{n}", n + 1
    return path


def is_builtin_dir(path: str | Path) -> bool:
    """Whether `path` is the package's own digits directory, where the shipped weights live."""
    return Path(path).resolve() == BUILTIN_DIR.resolve()


def run_dir(out: str | Path | None = None, overwrite_builtin: bool = False) -> Path:
    """Where a training run writes: `out`, else a new runs/digits-<time>; the shipped weights' directory only with
    `overwrite_builtin` (refused otherwise, before any training)."""
    from ..errors import DitexportError

    if overwrite_builtin:
        if out and not is_builtin_dir(out):
            raise DitexportError(f"--overwrite-builtin writes {BUILTIN_DIR}; drop it, or drop --out {out}")
        return BUILTIN_DIR
    if out and is_builtin_dir(out):
        raise DitexportError(f"{out} holds the shipped digits weights; pass --overwrite-builtin to replace them")
    return Path(out) if out else new_run_dir()


def train_and_save(cfg: DigitsTrainConfig, out_dir: str | Path, progress: bool = True) -> tuple[Path, dict]:
    """Trains, checks in seconds that the EMA model draws the requested digits, and saves its weights with the
    training summary (its "quick_class_agreement" is that check); returns the weights' path and the summary."""
    from .digits_eval import quick_class_agreement

    result = train_digits(cfg, progress=progress)
    summary = training_summary(result)
    summary["quick_class_agreement"] = quick_class_agreement(result.ema)
    summary["seconds"] = result.seconds
    return save_weights(result.ema, out_dir, summary), summary


@dataclass
class TrainResult:
    """The raw and EMA models, the per-step losses and the wall time of the loop."""
    model: DiT
    ema: DiT
    losses: list[float]
    seconds: float
    config: DigitsTrainConfig


def learning_rate(step: int, cfg: DigitsTrainConfig) -> float:
    """Linear warm-up, then a cosine decay to zero: a fixed short budget ends on small steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay ramps up from 0.1, so the zero-initialised start does not linger in a short run."""
    return min(decay, (1 + step) / (10 + step))


def train_digits(cfg: DigitsTrainConfig | None = None, progress: bool = True,
                 images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> TrainResult:
    """Trains a DiT on the digits (or on given [-1, 1] images and labels), seeded and reproducible."""
    from ..diffusion import create_diffusion
    from .digits_data import load_digits_tensors

    cfg = cfg or DigitsTrainConfig()
    if images is None:
        images, labels = load_digits_tensors()
    # The global seed fixes the initialisation and the class dropout (torch.rand inside the model);
    # one generator fixes batches, timesteps and noise.
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DiT.from_config(get_config(cfg.model)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="training digits DiT", unit="step")
    n = images.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    losses = []
    start = time.perf_counter()
    for step in steps:
        if cursor + cfg.batch_size > n:  # a new epoch, reshuffled
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x, y = images[idx], labels[idx]
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        loss = diffusion.training_losses(model, x, t, noise=noise, model_kwargs=dict(y=y))["loss"].mean()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))
        losses.append(loss.item())
        if progress and step % 50 == 0:
            steps.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    seconds = time.perf_counter() - start
    return TrainResult(model=model.eval(), ema=ema, losses=losses, seconds=seconds, config=cfg)


@torch.no_grad()
def fixed_batch_loss(model: DiT, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> float:
    """The mean training loss (mse + vb) of `model` in eval mode (no class dropout) on one fixed batch."""
    from ..diffusion import create_diffusion

    was_training = model.training
    model.eval()
    loss = create_diffusion("").training_losses(model, x, t, noise=noise, model_kwargs=dict(y=y))["loss"].mean()
    model.train(was_training)
    return loss.item()


def save_weights(model: DiT, out_dir: str | Path, training: dict | None = None) -> Path:
    """Writes `weights.safetensors` (config in its metadata) and `config.json`, each atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict())
    metadata = {"config": config_json}
    if training is not None:
        metadata["training"] = json.dumps(training)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    path = out_dir / "weights.safetensors"
    with atomic_path(path) as tmp:  # published with a plain file's permissions: a shipped file is readable by all
        save_file(tensors, str(tmp), metadata=metadata)
    atomic_write_json(out_dir / "config.json", model.config.to_dict())
    return path


def training_summary(result: TrainResult, tail_steps: int = 100) -> dict:
    """What a later reader needs to reproduce and judge a run (stored in the weights' metadata); the final
    loss is the mean over the last `tail_steps` steps, or over all of them in a shorter run."""
    tail = result.losses[-tail_steps:]
    final_loss = round(sum(tail) / len(tail), 5) if tail else None
    return {"recipe": asdict(result.config), "seconds": round(result.seconds, 1),
            "final_loss_mean": final_loss, "final_loss_steps": len(tail), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
