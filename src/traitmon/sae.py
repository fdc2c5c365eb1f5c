"""A small TopK sparse autoencoder (Gao et al. 2024 style) for the SAE-latent baseline.

No pretrained SAE exists for SmolLM2 and no hub is reachable here, so the baseline trains one on base-model
activations at a trait layer. ``sae-lens`` was considered: it installs as a 320 kB wheel but pulls
transformer-lens, datasets, plotly and nltk, and its training runner streams Hub datasets, so we keep this
~100-line torch version (deterministic for a seed, saved as safetensors + JSON: data only, no code-carrying format).

Shapes: activations ``(n, hidden)``; latents ``(n, n_latents)`` with at most ``k`` non-zero per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from traitmon.errors import TraitmonError
from traitmon.io import atomic_path

TENSORS = ("w_enc", "b_enc", "w_dec", "b_dec")


@dataclass
class TopKSAE:
    """Encoder ``topk(relu((x - b_dec) @ w_enc + b_enc))``, decoder ``z @ w_dec + b_dec``; inputs are divided by
    ``scale`` (the mean activation norm over sqrt(hidden)) before encoding and multiplied back after decoding."""

    w_enc: np.ndarray  # (hidden, n_latents)
    b_enc: np.ndarray  # (n_latents,)
    w_dec: np.ndarray  # (n_latents, hidden), rows unit norm
    b_dec: np.ndarray  # (hidden,)
    k: int
    scale: float
    info: dict = field(default_factory=dict)

    @property
    def n_latents(self) -> int:
        return self.w_enc.shape[1]

    def encode(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _encode(_tensors(self), torch.as_tensor(np.asarray(x, np.float32) / self.scale), self.k).numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float32) @ self.w_dec + self.b_dec) * self.scale

    def save(self, path: str | Path) -> None:
        """``path`` (safetensors: the four weight tensors) and ``path`` with suffix ``.json`` (k, scale, info)."""
        from safetensors.numpy import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({name: np.ascontiguousarray(getattr(self, name), np.float32) for name in TENSORS}, str(tmp))
        with atomic_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"k": self.k, "scale": self.scale, "info": self.info}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> TopKSAE:
        from safetensors.numpy import load_file

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise TraitmonError(f"SAE {path}: needs {path.name} and {meta_path.name}")
        tensors = load_file(str(path))
        missing = [name for name in TENSORS if name not in tensors]
        if missing:
            raise TraitmonError(f"SAE {path}: missing tensors {missing}")
        meta = json.loads(meta_path.read_text())
        return cls(**{name: tensors[name] for name in TENSORS}, k=int(meta["k"]), scale=float(meta["scale"]),
                   info=meta.get("info", {}))


def _tensors(sae: TopKSAE) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(getattr(sae, name)) for name in TENSORS}


def _encode(p: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    pre = torch.relu((x - p["b_dec"]) @ p["w_enc"] + p["b_enc"])
    top = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)


def fit_topk_sae(activations: np.ndarray, n_latents: int = 1024, k: int = 16, steps: int = 2000,
                 batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> TopKSAE:
    """Fit on ``activations`` (n, hidden) by Adam on the mean squared reconstruction error; decoder rows are
    renormalised to unit length after each step (so latent sizes carry the scale). Same seed, same weights."""
    x_np = np.asarray(activations, np.float32)
    if x_np.ndim != 2 or len(x_np) < 2:
        raise TraitmonError(f"fit_topk_sae: expected activations (n >= 2, hidden), got shape {x_np.shape}")
    if not 1 <= k <= n_latents:
        raise TraitmonError(f"fit_topk_sae: need 1 <= k <= n_latents, got k={k}, n_latents={n_latents}")
    scale = float(np.linalg.norm(x_np, axis=1).mean() / np.sqrt(x_np.shape[1])) or 1.0
    x = torch.as_tensor(x_np / scale)
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_latents, x.shape[1], generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    params = {"w_enc": w_dec.T.clone(), "b_enc": torch.zeros(n_latents), "w_dec": w_dec,
              "b_dec": x.median(dim=0).values.clone()}  # geometric-median-like start, as in the TopK paper
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)]
        recon = _encode(params, batch, k) @ params["w_dec"] + params["b_dec"]
        loss = ((recon - batch) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["w_dec"] /= params["w_dec"].norm(dim=1, keepdim=True).clamp_min(1e-8)
    arrays = {name: p.detach().numpy().copy() for name, p in params.items()}
    return TopKSAE(**arrays, k=k, scale=scale, info={"n_train": len(x_np), "steps": steps, "lr": lr, "seed": seed,
                                                     "batch_size": batch_size, "final_loss": float(loss.detach())})


def fraction_variance_explained(sae: TopKSAE, x: np.ndarray) -> float:
    """1 - ||x - decode(encode(x))||^2 / ||x - mean(x)||^2: > 0 means better than predicting the mean."""
    x = np.asarray(x, np.float32)
    resid = x - sae.decode(sae.encode(x))
    return float(1 - (resid ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def latent_change(sae: TopKSAE, base: np.ndarray, checkpoint: np.ndarray) -> np.ndarray:
    """SAE latent-change features of one checkpoint: mean over prompts of encode(checkpoint) - encode(base).

    ``base`` and ``checkpoint`` are ``(prompt, hidden)`` activations of the same prompts at the SAE's layer; the
    result has one value per latent ``(n_latents,)``. Stack one row per checkpoint and reduce in-fold with
    :class:`TopVarianceLatents` to get the 7-d baseline features.
    """
    base, checkpoint = np.asarray(base), np.asarray(checkpoint)
    if base.shape != checkpoint.shape:
        raise TraitmonError(f"latent_change: base {base.shape} and checkpoint {checkpoint.shape} differ in shape")
    return (sae.encode(checkpoint) - sae.encode(base)).mean(0)


def latent_change_matrix(sae: TopKSAE, base: np.ndarray, checkpoints: np.ndarray) -> np.ndarray:
    """:func:`latent_change` for a stack of checkpoints ``(checkpoint, prompt, hidden)`` -> ``(checkpoint,
    n_latents)``, the base encoded once. Rows may be pooled prompt activations (``response_mean``) or tokens;
    the SAE is best trained on the same kind of rows it encodes here."""
    checkpoints = np.asarray(checkpoints)
    if checkpoints.ndim != 3 or checkpoints.shape[1:] != np.shape(base):
        raise TraitmonError(f"latent_change_matrix: checkpoints {checkpoints.shape} do not stack base {np.shape(base)}")
    base_mean = sae.encode(base).mean(0)
    return np.stack([sae.encode(c).mean(0) - base_mean for c in checkpoints])


class TopVarianceLatents:
    """Reduce SAE latent-change features to the ``n`` latents of largest variance (default 7, the trait count).

    A scikit-learn-style transformer so it sits inside the monitor's pipeline: ``fit`` sees only the training
    fold's rows (LOPO / leave-one-domain-out), so the held-out run never chooses its own latents. Chosen over
    PCA because each kept dimension stays one interpretable latent; ties break by the lower latent index.
    """

    def __init__(self, n: int = 7):
        self.n = n

    def fit(self, x: np.ndarray, y=None) -> TopVarianceLatents:
        var = np.asarray(x, float).var(axis=0)
        self.latents_ = np.sort(np.argsort(-var, kind="stable")[: self.n])
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[:, self.latents_]

    def fit_transform(self, x: np.ndarray, y=None) -> np.ndarray:
        return self.fit(x).transform(x)

    def get_params(self, deep: bool = True) -> dict:
        return {"n": self.n}

    def set_params(self, **params) -> TopVarianceLatents:
        self.n = params.get("n", self.n)
        return self
