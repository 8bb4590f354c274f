"""The multi-task loss of MMA-MRNNet (Eq. 3): L = L_CCC + L_CCE + L_BCE + L_DM, plus L_teacher where teacher AUs from
measured movement are given.

Each supervised term is averaged over the samples of the batch that carry its label (datasets annotate different
tasks), and a term with no labelled sample in the batch is 0.
L_DM (Eq. 1-2) matches the AU head to the pseudo-AUs r' = sum_e p(e) r_{AU|e} of the expression head on
every sample. The paper prints only the positive part -r' log r_AU, which is minimised by predicting every
AU present; by default this uses the full soft-target BCE -[r' log r + (1 - r') log(1 - r)] (the
minimiser is r = r'), and `dm_form="printed"` keeps the printed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from affextract.schema import AU, AU_PRIOR, EXPR, VA

DM_FORMS = ("full", "printed")


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_CCC = 1 - (CCC_valence + CCC_arousal) / 2 over the batch; (B, 2) tanh outputs and labels."""
    from affextract.training.evaluate import ccc

    return 1.0 - ccc(pred, target).mean()


def dm_loss(expr_logits: torch.Tensor, au_logits: torch.Tensor, form: str = "full", target_grad: bool = False,
            keep: torch.Tensor | None = None) -> torch.Tensor:
    """L_DM (Eq. 2): AU head vs the pseudo-AUs of Eq. 1; summed over the 17 AUs, averaged over the batch.

    `target_grad=False` treats r' as a fixed target, so L_DM teaches the AU head without pulling the
    expression head towards whatever the AU head currently says. `keep` (B, 17) bool, when given, limits
    the sum to those entries (the ones without a measured teacher AU).
    """
    if form not in DM_FORMS:
        raise ValueError(f"dm form {form!r} is not one of {DM_FORMS}")
    prior = torch.as_tensor(AU_PRIOR, device=expr_logits.device, dtype=torch.float32)  # (7, 17)
    r = torch.softmax(expr_logits.float(), 1) @ prior  # (B, 17) Eq. 1
    if not target_grad:
        r = r.detach()
    z = au_logits.float()
    if form == "printed":
        per = -r * F.logsigmoid(z)
    else:
        per = F.binary_cross_entropy_with_logits(z, r, reduction="none")
    if keep is not None:
        per = per * keep
    return per.sum(1).mean()


def mma_losses(
    out: torch.Tensor, va: torch.Tensor, expr: torch.Tensor, au: torch.Tensor,
    dm_form: str = "full", dm_target_grad: bool = False,
    teacher: torch.Tensor | None = None, expr_offset: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The four terms of Eq. 3, plus L_teacher, for (B, 26) pre-activations and labels with NaN = not annotated.

    va (B, 2) in [-1, 1]; expr (B, 7) target distribution (one-hot or votes); au (B, 17) in {0, 1};
    teacher (B, 17) soft AU targets in [0, 1] from a teacher (NaN = none): L_teacher is their BCE, averaged
    over the (sample, AU) pairs that have one; L_DM covers the other pairs (AUs without a teacher, such as
    AU11/AU23, and samples without one), so the prior never pulls against a measured movement.
    `expr_offset` (7,) is added to the expression logits inside L_CCE only (logit-adjusted loss, Menon et al. 2021: with tau * log(prior) the logits
    themselves learn the balanced posterior instead of the training set's class prior).
    """
    out = out.float()
    zero = out.new_zeros(())
    m = torch.isfinite(va).all(1)
    l_ccc = ccc_loss(torch.tanh(out[m, VA]), va[m]) if m.sum() >= 2 else zero
    m = torch.isfinite(expr).all(1)
    logits = out[m, EXPR] if expr_offset is None else out[m, EXPR] + expr_offset
    l_cce = -(expr[m] * torch.log_softmax(logits, 1)).sum(1).mean() if m.any() else zero
    m = torch.isfinite(au)
    l_bce = (
        F.binary_cross_entropy_with_logits(out[:, AU][m], au[m]) if m.any() else zero
    )
    has = torch.isfinite(teacher) if teacher is not None else None
    l_dm = dm_loss(out[:, EXPR], out[:, AU], dm_form, dm_target_grad, None if has is None else ~has)
    l_teacher = zero
    if has is not None and has.any():
        l_teacher = F.binary_cross_entropy_with_logits(out[:, AU][has], teacher[has])
    return {"ccc": l_ccc, "cce": l_cce, "bce": l_bce, "dm": l_dm, "teacher": l_teacher}
