"""seqhead heads: one contract over every head variant, the Mask, and the routing rule under Adam."""

import itertools

import pytest
import torch

from seqhead.fit import RoutedAdam
from seqhead.metrics import pearson_loss
from seqhead.model import ModelConfig, SeqHead, valid_mask

F, T, N = 5, 12, 3
VARIANTS = [
    dict(head=h, mask=m, rnn=r, layers=layers, skip_padding=s)
    for h, m, r, layers, s in itertools.product(("mrnn", "mean", "attn", "last"), (True, False),
                                                ("gru", "lstm", "conv"), (1, 2), ("truncate", "pack", "none"))
    if not (h == "last" and not m) and (m or s == "none") and not (r == "conv" and layers == 2)
]


def _batch(seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 7, 3, 1][:B])
    x = torch.randn(B, T, F, generator=g) * valid_mask(lengths, T)[..., None]  # zero padding, as pad_batch
    return x, lengths


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_head_contract(kw):
    torch.manual_seed(0)
    model = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, hidden=6, fc=4, **kw))
    x, lengths = _batch()
    y = model(x, lengths)
    assert y.shape == (4, N) and torch.isfinite(y).all()
    (pearson_loss(y, torch.randn(4, N)) + y.pow(2).mean()).backward()  # Pearson alone ignores fc2.bias
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    if kw["mask"]:
        # Whatever sits beyond l (padding of any length or content) does not change the outputs.
        garbage = x + 100 * torch.randn_like(x) * ~valid_mask(lengths, T)[..., None]
        torch.testing.assert_close(model(garbage, lengths), y, rtol=0, atol=1e-5)
        if kw["head"] != "mrnn":
            short = x[:, : int(lengths.max() - 1)]  # a shorter padded length, same lengths where they fit
            cut = lengths.clamp(max=short.shape[1])
            torch.testing.assert_close(model(short, cut)[1:], model(x, cut)[1:], rtol=0, atol=1e-5)


def test_mask_zeroes_positions_beyond_l_before_the_first_fc():
    torch.manual_seed(0)  # with fc = 4, some initialisations leave every ReLU of video 2 off (no gradient at all)
    model = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head="mrnn", hidden=6, fc=4))
    x, lengths = _batch()
    z = model.encode(x, lengths)  # (B, T', d')
    for b, l in enumerate(lengths.tolist()):
        assert not z[b, l:].any() and z[b, :l].abs().sum(-1).gt(0).all()
    # The paper's head sees positions only through fc1 columns [p·d', (p+1)·d'): those past l get no gradient.
    model(x[2:3], lengths[2:3]).sum().backward()
    g = model.fc1.weight.grad
    assert not g[:, 3 * 6:].any() and g[:, : 3 * 6].abs().sum() > 0
    assert model.routed_columns(lengths[1:]) == 7 * 6


def _two_steps(optim_cls, model, x, lengths):
    """Step 1 on a batch with a long video, step 2 on a batch whose longest video has 3 frames."""
    opt = optim_cls(model.parameters(), lr=1e-2)
    snaps = []
    for idx in ([0, 1], [2, 3]):
        loss = model(x[idx], lengths[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        n = model.routed_columns(lengths[idx])
        if optim_cls is RoutedAdam:
            opt.step({model.fc1.weight: n})
        else:
            opt.step()
        st = opt.state[model.fc1.weight]
        snaps.append((model.fc1.weight.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
                      st["step"].clone()))
    return snaps


def test_routing_leaves_unrouted_weights_and_adam_state_bit_exact():
    torch.manual_seed(0)
    model = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head="mrnn", hidden=6, fc=4))
    x, lengths = _batch()
    (w1, m1, v1, s1), (w2, m2, v2, s2) = _two_steps(RoutedAdam, model, x, lengths)
    cut = 3 * 6  # step 2's longest video has 3 frames: columns ≥ 18 are masked for the whole batch
    assert torch.equal(w2[:, cut:], w1[:, cut:])
    assert torch.equal(m2[:, cut:], m1[:, cut:]) and torch.equal(v2[:, cut:], v1[:, cut:])
    assert torch.equal(s2[cut:], s1[cut:]) and (s2[:cut] == 2).all() and (s2[cut:] == 1).all()
    assert not torch.equal(w2[:, :cut], w1[:, :cut])  # routed columns do learn
    assert m1[:, cut:].abs().sum() > 0  # ... and the frozen ones carry moments that plain Adam would apply

    # Plain Adam, same start: zero gradients do not stop it from moving the masked columns.
    torch.manual_seed(0)
    plain = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head="mrnn", hidden=6, fc=4))
    (pw1, *_), (pw2, *_) = _two_steps(torch.optim.Adam, plain, x, lengths)
    assert not torch.equal(pw2[:, cut:], pw1[:, cut:])


def test_routed_adam_is_adam_for_unrouted_parameters():
    torch.manual_seed(0)
    a = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head="mean", hidden=6, fc=4))
    b = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head="mean", hidden=6, fc=4))
    b.load_state_dict(a.state_dict())
    oa, ob = RoutedAdam(a.parameters(), lr=1e-2, weight_decay=1e-3), torch.optim.Adam(b.parameters(), lr=1e-2,
                                                                                   weight_decay=1e-3)
    x, lengths = _batch()
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x, lengths).pow(2).mean().backward()
            o.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("rnn", ["gru", "conv"])
@pytest.mark.parametrize("head", ["mrnn", "mean", "attn", "last"])
def test_skipping_padding_gives_the_same_outputs(head, rnn):
    x, lengths = _batch()
    outs = []
    for skip in ("none", "truncate", "pack"):
        torch.manual_seed(0)
        model = SeqHead(ModelConfig(n_features=F, n_targets=N, t=T, head=head, rnn=rnn, hidden=6, fc=4,
                                    skip_padding=skip))
        outs.append(model(x, lengths))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-5)


def test_pearson_loss_gradient_is_finite_for_identical_predictions():
    pred = torch.zeros(4, N, requires_grad=True)  # every video predicted the same (all ReLUs of the FC off)
    loss = pearson_loss(pred * 1.0, torch.randn(4, N))
    loss.backward()
    assert torch.isclose(loss, torch.tensor(1.0)) and torch.isfinite(pred.grad).all()
