"""The centred surrogate indicator xi_c: xi without the assumption sum_i g_i = 0.

The derivation of xi (``docs/surrogate.md``) replaces the variance of the predicted subset sums,
Var_S(tau^T 1_S) = c ||P tau||^2 with P = I - 1 1^T / n, by c ||tau||^2, which holds when the
training gradients sum to zero (a stationary point of the mean loss). Trained models are not
there (weight decay, a finite number of steps), and measured against ground truth the zero of
the resulting condition lies 0.3-0.6 decades above the optimum of the population LDS
(``tdatune.evaluate.condition``). Keeping P, the sign of dLDS/dlambda is that of

    (s^T B r)(s^T B P B^2 s) - (s^T B^2 r)(s^T B P B s),

and Cauchy-Schwarz in <x, y> = x^T B y on s^T B^2 r gives the sufficient condition
corr_B(s, r) > xi_c with

    xi_c = sqrt(S3) (S2 - T1^2 / n) / (sqrt(S1) (S3 - T1 T2 / n)),
    S_j = sum_k nu_k c_k^2 / (sigma_k + lambda)^j,   T_j = sum_k o_k c_k / (sigma_k + lambda)^j,

with a the training coordinates (n x k), nu_k = ||a_k||^2 and o_k = sum_i a_ik, so that T_1 / n
is minus the mean score. For the Fisher (nu_k = n sigma_k) and sum_i g_i = 0 it is xi. It
needs xi's inputs and the training coordinates' column norms and sums, and tends to 1 as
lambda grows; unlike xi it is not bounded by 1 for every lambda (NaN where S3 <= T1 T2 / n).
"""

from __future__ import annotations

import torch

from tdatune.utils.checks import check_positive_lambdas, check_shape


def centered_indicator(sigma: torch.Tensor, c: torch.Tensor, train_coords: torch.Tensor,
                       lambdas: torch.Tensor | list[float] | float) -> torch.Tensor:
    """xi_c for every explained example (rows of ``c`` [m, k]) and lambda: [m, L], from the
    training coordinates [n, k] of the same eigenbasis (a lambda-path's ``train_coords``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64)
    c = c[None] if c.dim() == 1 else c
    a = torch.as_tensor(train_coords, dtype=torch.float64)
    check_shape("c", c, [None, sigma.shape[0]])
    check_shape("train_coords", a, [None, sigma.shape[0]])
    n = a.shape[0]
    nu, ones = a.pow(2).sum(dim=0), a.sum(dim=0)
    lam = check_positive_lambdas(lambdas)
    inv = 1.0 / (sigma[:, None] + lam[None, :])             # [k, L]
    w = nu * c.pow(2)
    s1, s2, s3 = (w @ inv.pow(j) for j in (1, 2, 3))
    t1, t2 = ((c * ones) @ inv.pow(j) for j in (1, 2))
    num = s3.sqrt() * (s2 - t1.pow(2) / n)
    den = s1.sqrt() * (s3 - t1 * t2 / n)
    out = num / den
    out[~(den > 0) | ~(s1 > 0)] = float("nan")
    return out
