"""The rational erf of the GELU kernel (benchbox/kernels.py, ``gelu_cdf_n``): erf(z) ~ z P(z^2) / Q(z^2) on
[0, 3.92] (erf(3.92) rounds to 1 in float32; the kernel clamps |z| there), P of degree 5, Q of degree 5 with
Q(0) = 1. Fitted by weighted linear least squares on Chebyshev points (Loeb's iteration: weights 1/Q from the
last round), then Lawson reweighting towards the minimax error. Prints the float32 coefficients the kernel holds
and the error of the fit (double) and of a float32 evaluation against math.erf.

    python benchmarks/erf_fit.py
"""
import math

import numpy as np

Z_MAX, P_DEG, Q_DEG = 3.92, 5, 5


def fit(z, f, m=P_DEG, n=Q_DEG, rounds=30):
    u, q, w = z * z, np.ones_like(z), np.ones_like(z)
    for r in range(rounds):
        # z P(u) - f (Q(u) - 1) = f, unknowns p_0..p_m and q_1..q_n, each row weighted by w / Q_last(u)
        a = np.hstack([np.stack([z * u ** k for k in range(m + 1)], 1),
                       np.stack([-f * u ** k for k in range(1, n + 1)], 1)])
        c, *_ = np.linalg.lstsq(a * (w / q)[:, None], f * w / q, rcond=None)
        p, qc = c[:m + 1], np.concatenate([[1.0], c[m + 1:]])
        q = np.polyval(qc[::-1], u)
        err = z * np.polyval(p[::-1], u) / q - f
        if r > 5:  # Lawson: weight up where the error is large
            w = w * np.abs(err) ** 0.5
            w /= w.max()
    return p, qc, float(np.abs(err).max())


def float32_error(p, q, z_max=Z_MAX):
    z = np.linspace(0, 6, 200_001).astype(np.float32)
    zc, (p32, q32) = np.minimum(z, np.float32(z_max)), (p.astype(np.float32), q.astype(np.float32))
    u = zc * zc
    pp, qq = np.full_like(z, p32[-1]), np.full_like(z, q32[-1])
    for k in range(len(p32) - 2, -1, -1):
        pp = pp * u + p32[k]
    for k in range(len(q32) - 2, -1, -1):
        qq = qq * u + q32[k]
    val = np.minimum(zc * pp / qq, np.float32(1.0)).astype(np.float64)
    return float(np.abs(val - np.array([math.erf(float(v)) for v in z])).max())


def main():
    z = np.cos(np.linspace(np.pi, 0, 6000)) * Z_MAX / 2 + Z_MAX / 2
    z = z[z > 0]
    p, q, err = fit(z, np.array([math.erf(v) for v in z]))
    print("P:", ", ".join(f"{np.float32(c).item():.9g}f" for c in p))
    print("Q:", ", ".join(f"{np.float32(c).item():.9g}f" for c in q))
    print(f"max |error| of the fit {err:.2e}; of a float32 evaluation on [0, 6] {float32_error(p, q):.2e}")


if __name__ == "__main__":
    main()
