"""The torch DCN-v2 risk head (SPEC §7 option; the paper's g is a DCN): `risk_model = "dcn"`.

    DCNv2(n_in, cfg)                x0 -> n_cross × CrossLayer -> ∥ deep MLP -> logit
    fit_dcn(X, y, t, cfg) -> DCNRiskModel     same contract as hybrid.fit_risk_model

Cross layer (Wang et al., 2021, "DCN V2"): x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l, full-rank W_l. The cross
stack and a ReLU MLP run in parallel on the same input and their outputs are concatenated before the
logit. Inputs are standardised with the training rows' mean and std; NaN (LightGBM's "missing") becomes 0
plus a missing-indicator column for every feature that has any NaN. Class imbalance: the positive term of
the BCE is weighted by sqrt(negatives / positives), as for LightGBM. Early stopping on the average
precision of the last `valid_share` of the training period by time of held-out customers
(hybrid.early_stopping_split, the fit slice being the other customers' earlier rows), best weights kept. CPU,
one thread.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from pantherseq.errors import ConfigError
from pantherseq.eval.metrics import average_precision
from pantherseq.fraud.hybrid import check_split, risk_split

log = logging.getLogger(__name__)


@dataclass
class DCNConfig:
    n_cross: int = 3
    hidden: list[int] | None = None  # deep tower widths; None = [256, 128]
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    max_epochs: int = 30
    patience: int = 3
    valid_share: float = 0.2
    valid_customers: float = 0.5  # as LGBMConfig: the early-stopping slice's customers are not fitted
    pos_weight: float | None = None  # None = sqrt(negatives / positives)
    seed: int = 0

    def validate(self, where: str) -> None:
        check_split(self, where)


class CrossLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> (B, d)."""
        return x0 * self.lin(x) + x


class DCNv2(nn.Module):
    def __init__(self, n_in: int, cfg: DCNConfig):
        super().__init__()
        widths = cfg.hidden or [256, 128]
        self.cross = nn.ModuleList(CrossLayer(n_in) for _ in range(cfg.n_cross))
        layers: list[nn.Module] = []
        d = n_in
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU(), nn.Dropout(cfg.dropout)]
            d = w
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(n_in + d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_in) -> (B,) logits."""
        c = x
        for layer in self.cross:
            c = layer(x, c)
        return self.head(torch.cat([c, self.deep(x)], dim=1)).squeeze(1)


class Scaler:
    """Standardise with training statistics; NaN -> 0 plus a missing indicator per column that has NaN."""

    def __init__(self, X: np.ndarray):
        with np.errstate(all="ignore"):
            self.mean = np.nan_to_num(np.nanmean(X, 0))
            self.std = np.nan_to_num(np.nanstd(X, 0), nan=1.0)
        self.std[self.std < 1e-9] = 1.0
        self.missing = np.flatnonzero(np.isnan(X).any(0))

    @classmethod
    def from_stats(cls, mean: np.ndarray, std: np.ndarray, missing: np.ndarray) -> Scaler:
        out = cls.__new__(cls)
        out.mean, out.std, out.missing = mean, std, missing
        return out

    def __call__(self, X: np.ndarray) -> torch.Tensor:
        nan = np.isnan(X)
        Z = np.where(nan, 0.0, (X - self.mean) / self.std)
        return torch.from_numpy(np.hstack([Z, nan[:, self.missing]]).astype(np.float32))


class DCNRiskModel:
    """A trained DCN-v2, its input scaler and the feature names it expects (registered as `dcn` in
    fraud/risk.py's RISK_MODELS)."""

    kind = "dcn"

    def __init__(self, net: DCNv2, scaler: Scaler, features: list[str], info: dict):
        self.net, self.scaler, self.features, self.info = net, scaler, features, info

    def predict(self, X: pl.DataFrame) -> np.ndarray:
        return self.predict_matrix(X.select(self.features).cast(pl.Float64).to_numpy())

    @torch.no_grad()
    def predict_matrix(self, M: np.ndarray) -> np.ndarray:
        """(N, F) in `features` order (NaN = missing) -> (N,) scores."""
        self.net.eval()
        Z = self.scaler(np.asarray(M, dtype=np.float64))
        return torch.cat([torch.sigmoid(self.net(Z[i:i + 65536])) for i in range(0, len(Z), 65536)]).numpy()

    def importances(self) -> pl.DataFrame:
        return pl.DataFrame({"feature": self.features, "gain": [float("nan")] * len(self.features),
                             "split": [0] * len(self.features)})

    def save(self, stem: str | Path) -> None:
        """stem.pt (weights, scaler, config; `torch.load(weights_only=True)`) + stem.json (kind, features)."""
        stem = Path(stem)
        torch.save({"state_dict": self.net.state_dict(), "features": self.features,
                    "mean": torch.from_numpy(np.asarray(self.scaler.mean, np.float64)),
                    "std": torch.from_numpy(np.asarray(self.scaler.std, np.float64)),
                    "missing": torch.from_numpy(np.asarray(self.scaler.missing, np.int64)),
                    "config": dataclasses.asdict(self.cfg), "n_in": self.n_in, "info": self.info},
                   stem.with_suffix(".pt"))
        stem.with_suffix(".json").write_text(json.dumps({"kind": self.kind, "features": self.features,
                                                         **self.info}, indent=1))

    @classmethod
    def load(cls, stem: str | Path) -> DCNRiskModel:
        state = torch.load(Path(stem).with_suffix(".pt"), map_location="cpu", weights_only=True)
        cfg = DCNConfig(**state["config"])
        net = DCNv2(int(state["n_in"]), cfg)
        net.load_state_dict(state["state_dict"])
        scaler = Scaler.from_stats(state["mean"].numpy(), state["std"].numpy(), state["missing"].numpy())
        model = cls(net.eval(), scaler, list(state["features"]), dict(state["info"]))
        model.cfg, model.n_in = cfg, int(state["n_in"])
        return model


def fit_dcn(X: pl.DataFrame, y: np.ndarray, t: np.ndarray, cfg: DCNConfig,
            categorical: list[str] | None = None, customer: np.ndarray | None = None) -> DCNRiskModel:
    """Train on rows X (features by name); categorical codes are used as numbers (few values)."""
    torch.manual_seed(cfg.seed)
    y = np.asarray(y).astype(np.float32)
    pos, neg = int(y.sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        raise ConfigError(f"the risk model's training period has {pos} frauds and {neg} genuine events")
    features = list(X.columns)
    M = X.cast(pl.Float64).to_numpy()
    fit_rows, valid_rows, disjoint = risk_split(t, y, customer, cfg)
    scaler = Scaler(M[fit_rows])
    Zf, Zv = scaler(M[fit_rows]), scaler(M[valid_rows])
    yf, yv = torch.from_numpy(y[fit_rows]), y[valid_rows]
    net = DCNv2(Zf.shape[1], cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weight = torch.tensor(cfg.pos_weight if cfg.pos_weight is not None else float(np.sqrt(neg / pos)))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
    best, best_state, bad, epoch = -1.0, None, 0, 0
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(1, cfg.max_epochs + 1):
        net.train()
        perm = torch.from_numpy(rng.permutation(len(Zf)))
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = loss_fn(net(Zf[b]), yf[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            ap = average_precision(torch.sigmoid(net(Zv)).numpy(), yv)
        if ap > best:
            best, best_state, bad = ap, copy.deepcopy(net.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    net.load_state_dict(best_state)
    info = {"epochs": epoch, "valid_average_precision": best, "pos_weight": float(weight),
            "train_rows": len(y), "train_frauds": pos, "fit_rows": len(fit_rows), "valid_rows": len(valid_rows),
            "customer_disjoint": disjoint}
    log.info("DCN risk model: %d inputs, %d epochs, early-stopping AP %.4f", Zf.shape[1], epoch, best)
    model = DCNRiskModel(net, scaler, features, info)
    model.cfg, model.n_in = cfg, int(Zf.shape[1])
    return model
