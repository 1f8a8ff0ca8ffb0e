"""Training losses: CE, PGD-AT, TRADES, MART, LBGAT and D2R, each as its official code computes it.

Chapter 2 introduces `pgd_at_loss`, chapter 3 `trades_loss`, chapter 4 `lbgat_loss`, chapter 5
`d2r_loss`. Logits in, a scalar out; the `*_terms` functions return every term for logging. Nothing
is detached. Each function makes the official code's operations in the official order (same
rounding, same gradient accumulation order), so a training step is bitwise the official one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate

__all__ = [
    "OFFICIAL_KL_EPS", "KL_REDUCTIONS", "official_k", "official_kl", "ce_loss", "pgd_at_loss",
    "trades_kl",
    "trades_terms", "trades_loss", "mart_terms", "mart_loss", "lbgat_terms", "lbgat_loss",
    "d2r_terms",
    "d2r_loss", "term_gradient_norms",
]

OFFICIAL_KL_EPS = 1e-5
KL_REDUCTIONS = ("mean", "batchmean")


def official_k(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The official helper k(a, b) = −a·b + log(b + 1e-5)·b (a = log q, b = p), elementwise, written
    as the official code writes it (same operations, same rounding); summed over classes ≈ KL(p ‖
    q)."""
    return -log_q * p + torch.log(p + OFFICIAL_KL_EPS) * p


def official_kl(p: torch.Tensor, log_q: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """K̄L(P ‖ Q) as the official D2R code computes it: −log q·p + log(p + 1e-5)·p.

    reduction="mean": averaged over batch × classes (the official value, 1/C of the usual KL);
    reduction="batchmean": summed over classes, averaged over the batch (the per-sample KL
    convention).
    """
    validate.choice("reduction", reduction, KL_REDUCTIONS)
    k = official_k(p, log_q)
    return k.mean() if reduction == "mean" else k.sum() / p.shape[0]


def _k_term(logits_q: torch.Tensor, logits_p: torch.Tensor, reduction: str) -> torch.Tensor:
    """kl_loss(log_softmax(logits_q), softmax(logits_p)) reduced: the official D2R operations in
    order."""
    log_q = F.log_softmax(logits_q, dim=1)
    p = F.softmax(logits_p, dim=1)
    return official_kl(p, log_q, reduction)


def _check(y=None, **named_logits):
    for name, z in named_logits.items():
        validate.logits(z, name)
    validate.same_shape(**named_logits)
    if y is not None:
        first = next(iter(named_logits.values()))
        validate.labels(y, first.shape[1], first.shape[0])


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over the batch (standard training). Chapter 1."""
    _check(y, logits=logits)
    return F.cross_entropy(logits, y)


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Madry et al.: CE on the adversarial logits. Chapter 2."""
    _check(y, logits_adv=logits_adv)
    return F.cross_entropy(logits_adv, y)


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p(x) ‖ p(x′)) summed over classes and averaged over the batch (TRADES' regulariser),
    computed as the official `(1.0 / batch_size) * KLDivLoss(size_average=False)(log_softmax(z′),
    softmax(z))`."""
    log_adv = F.log_softmax(logits_adv, dim=1)
    return (1.0 / logits_nat.shape[0]) * F.kl_div(log_adv, F.softmax(logits_nat, dim=1),
                                                  reduction="sum")


def trades_terms(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                 beta: float = 6.0,
                 logits_nat_kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """TRADES terms: "ce" = CE(f(x), y), "kl" = KL(p_f(x) ‖ p_f(x′)), "loss" = ce + β·kl. Chapter 3.

    The official step runs f on x a second time for the KL: pass that second f(x) as `logits_nat_kl`
    (None: the KL uses `logits_nat`, the same value without the extra pass).
    """
    nat_kl = logits_nat if logits_nat_kl is None else logits_nat_kl
    _check(y, logits_nat=logits_nat, logits_adv=logits_adv, logits_nat_kl=nat_kl)
    validate.number("beta", beta, min=0)
    terms = {"ce": F.cross_entropy(logits_nat, y), "kl": trades_kl(nat_kl, logits_adv)}
    terms["loss"] = terms["ce"] + beta * terms["kl"]
    return terms


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                beta: float = 6.0) -> torch.Tensor:
    """TRADES: CE(f(x), y) + β·KL(p_f(x) ‖ p_f(x′)). Chapter 3."""
    return trades_terms(logits_nat, logits_adv, y, beta=beta)["loss"]


def mart_terms(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
               beta: float = 6.0) -> dict[str, torch.Tensor]:
    """MART terms as the official MART code: "bce" (boosted CE on x′), "kl" (KL(p(x) ‖ p(x′))
    weighted by 1 − p(x)_y), "loss" = bce + β·kl. Chapter 7."""
    _check(y, logits_nat=logits_nat, logits_adv=logits_adv)
    validate.number("beta", beta, min=0)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), other)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    terms = {"bce": bce,
             "kl": (1.0 / logits_nat.shape[0]) * torch.sum(kl * (1.0000001 - true_probs))}
    terms["loss"] = terms["bce"] + float(beta) * terms["kl"]
    return terms


def mart_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
              beta: float = 6.0) -> torch.Tensor:
    """MART: boosted CE on x′ + β·KL(p(x) ‖ p(x′))·(1 − p(x)_y). Chapter 7."""
    return mart_terms(logits_nat, logits_adv, y, beta=beta)["loss"]


def lbgat_terms(logits_adv: torch.Tensor, logits_guide: torch.Tensor, y: torch.Tensor, *,
                beta: float = 0.0,
                logits_nat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """LBGAT terms: "mse" = MSE(f(x′), g(x)), "ce" = CE(g(x), y), "kl" = KL(p_f(x) ‖ p_f(x′)) when
    `logits_nat` = f(x) is given, "loss" = mse + ce + β·kl (the official order). β = 0 is the
    paper's CIFAR-10 "LBGAT0"; the official step computes f(x) and the KL term at β = 0 too. β > 0
    needs `logits_nat`. Chapter 4."""
    _check(y, logits_adv=logits_adv, logits_guide=logits_guide)
    validate.number("beta", beta, min=0)
    if beta > 0 and logits_nat is None:
        raise ValueError("lbgat_loss with beta > 0 needs logits_nat (the target's clean logits)")
    terms = {"mse": F.mse_loss(logits_adv, logits_guide), "ce": F.cross_entropy(logits_guide, y)}
    terms["loss"] = terms["mse"] + terms["ce"]
    if logits_nat is not None:
        _check(logits_nat=logits_nat, logits_adv=logits_adv)
        terms["kl"] = trades_kl(logits_nat, logits_adv)
        terms["loss"] = terms["loss"] + beta * terms["kl"]
    return terms


def lbgat_loss(logits_adv: torch.Tensor, logits_guide: torch.Tensor, y: torch.Tensor, *,
               beta: float = 0.0, logits_nat: torch.Tensor | None = None) -> torch.Tensor:
    """LBGAT: MSE(f(x′), g(x)) + CE(g(x), y) + β·KL(p_f(x) ‖ p_f(x′)). Chapter 4."""
    return lbgat_terms(logits_adv, logits_guide, y, beta=beta, logits_nat=logits_nat)["loss"]


def d2r_terms(logits_adv: torch.Tensor, logits_nat: torch.Tensor, logits_guide: torch.Tensor,
              y: torch.Tensor, *, w_clean: float = 20.0, w_adv: float = 30.0,
              kl_reduction: str = "mean") -> dict[str, torch.Tensor]:
    """Every term of the D2R loss (official code by default). Chapter 5.

    Returns a dict of tensors: "ce" = CE(g(x), y); "mse" = MSE(f(x′), g(x)) on logits;
    "kl_fg" = K̄L(p_f(x) ‖ p_g(x)); "kl_gf" = K̄L(p_g(x) ‖ p_f(x)); "clean" = |kl_fg − kl_gf|;
    "adv" = K̄L(p_f(x′) ‖ p_g(x)); "loss" = ce + mse + w_clean·clean + w_adv·adv.
    kl_reduction="mean" averages over batch × classes as the official code; "batchmean" is the
    per-sample KL.
    """
    _check(y, logits_adv=logits_adv, logits_nat=logits_nat, logits_guide=logits_guide)
    validate.number("w_clean", w_clean, min=0)
    validate.number("w_adv", w_adv, min=0)
    validate.choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
    terms = {"kl_fg": _k_term(logits_guide, logits_nat, kl_reduction),     # official kl_Loss1
             "kl_gf": _k_term(logits_nat, logits_guide, kl_reduction)}     # official kl_Loss2
    terms["clean"] = torch.abs(terms["kl_fg"] - terms["kl_gf"])
    terms["adv"] = _k_term(logits_guide, logits_adv, kl_reduction)        # official kl_Loss5
    terms["ce"] = F.cross_entropy(logits_guide, y)
    terms["mse"] = F.mse_loss(logits_adv, logits_guide)
    terms["loss"] = terms["ce"] + terms["mse"] + w_clean * terms["clean"] + w_adv * terms["adv"]
    return terms


def d2r_loss(logits_adv: torch.Tensor, logits_nat: torch.Tensor, logits_guide: torch.Tensor,
             y: torch.Tensor, *, w_clean: float = 20.0, w_adv: float = 30.0,
             kl_reduction: str = "mean") -> torch.Tensor:
    """The D2R loss, a scalar, exactly as the official `D2R_loss` by default. Chapter 5.

    CE(g(x), y) + MSE(f(x′), g(x)) + w_clean·|K̄L(p_f(x) ‖ p_g(x)) − K̄L(p_g(x) ‖ p_f(x))|
    + w_adv·K̄L(p_f(x′) ‖ p_g(x)), with K̄L averaged over batch × classes and +1e-5 inside the log.
    """
    return d2r_terms(logits_adv, logits_nat, logits_guide, y, w_clean=w_clean, w_adv=w_adv,
                     kl_reduction=kl_reduction)["loss"]


def term_gradient_norms(terms: dict, target: nn.Module, guide: nn.Module) -> dict:
    """For each loss term: (‖∇ term‖ w.r.t. the target's parameters, the same w.r.t. the guide's),
    0.0 where the term has no path to a model. Shows which model each term trains. Chapter 4."""
    f_params, g_params = list(target.parameters()), list(guide.parameters())

    def norm(grads):
        present = [g for g in grads if g is not None]
        return float(torch.sqrt(sum((g ** 2).sum() for g in present))) if present else 0.0

    rows = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, f_params + g_params, allow_unused=True,
                                    retain_graph=True)
        rows[name] = (norm(grads[:len(f_params)]), norm(grads[len(f_params):]))
    return rows
