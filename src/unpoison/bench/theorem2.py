"""Theorem 2 (paper Sec. 3.3, proof in App. A.3), checked numerically.

A feature is a balanced mixture of two Gaussians ``N(mu0, s)``, ``N(mu1, s)``; normalised to zero
mean and unit variance it becomes ``p_z = [N(-d_hat, s_hat) + N(d_hat, s_hat)] / 2`` with
``d_hat = r / sqrt(1 + r^2)``, ``s_hat = 1 / sqrt(1 + r^2)`` and ``r = delta / sigma`` (half the
distance between the means over the standard deviation). The theorem bounds

    1/2 ln(1 + r^2) - ln 2  <=  KLD(p_z || N(0, 1))  <=  1/2 ln(1 + r^2)

and says the KLD grows with r. Here the KLD is integrated with scipy's adaptive quadrature.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import integrate, stats


def bounds(r: float) -> tuple[float, float]:
    """(lower, upper) bound of Theorem 2 for ratio ``r``."""
    up = 0.5 * math.log1p(r * r)
    return up - math.log(2.0), up


def kld_mixture_vs_normal(r: float) -> float:
    """KLD(p_z || N(0,1)) for the normalised mixture with ratio ``r``, by numerical integration."""
    s = 1.0 / math.sqrt(1.0 + r * r)
    d = r * s

    def integrand(v: float) -> float:
        # log-densities for accuracy in the tails
        l0 = stats.norm.logpdf(v, -d, s)
        l1 = stats.norm.logpdf(v, d, s)
        lp = np.logaddexp(l0, l1) - math.log(2.0)
        return float(np.exp(lp) * (lp - stats.norm.logpdf(v)))

    lim = d + 12 * s
    parts = [(-lim, -d), (-d, 0.0), (0.0, d), (d, lim)]
    return float(sum(integrate.quad(integrand, a, b, limit=200, epsabs=1e-12, epsrel=1e-10)[0] for a, b in parts))


def check_theorem2(rs: list[float] | None = None, tol: float = 1e-7) -> dict[str, Any]:
    """Evaluate bounds and KLD on a grid of r; report violations and monotonicity."""
    rs = list(rs) if rs else [float(v) for v in np.concatenate([np.linspace(0.1, 1, 5), np.geomspace(1.5, 100, 8)])]
    rows = []
    for r in rs:
        lo, up = bounds(r)
        k = kld_mixture_vs_normal(r)
        rows.append({"r": r, "lower": lo, "kld": k, "upper": up,
                     "holds": bool(lo - tol <= k <= up + tol)})
    klds = [row["kld"] for row in rows]
    order = np.argsort(rs)
    increasing = bool(np.all(np.diff(np.asarray(klds)[order]) > -tol))
    return {"rows": rows, "all_hold": all(row["holds"] for row in rows), "kld_increasing_in_r": increasing,
            "max_gap_to_upper": max(row["upper"] - row["kld"] for row in rows),
            "min_gap_to_lower": min(row["kld"] - row["lower"] for row in rows)}
