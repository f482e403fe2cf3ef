"""minicai.losses against values worked out by hand (plain Python math), never against the code itself."""
import math

import pytest
import torch

from minicai.losses import (AdaptiveKLController, bradley_terry_loss, dpo_loss, explained_variance,
                            gae_advantages, kl_penalized_rewards, masked_mean, masked_whiten,
                            ppo_policy_loss, ppo_value_loss)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


NAN = float("nan")


# ----------------------------------------------------------------------------- masked statistics

def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, float("inf"), NAN]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty selection: 0, not nan


def test_masked_whiten():
    x = t(1.0, 2.0, 3.0, 100.0)  # mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    m = torch.tensor([1, 1, 1, 0])
    assert masked_whiten(x, m).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    assert masked_whiten(x, m, shift_mean=False).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0])
    x2 = x.clone(); x2[3] = NAN
    assert masked_whiten(x2, m).tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    y = torch.randn(3, 5, dtype=torch.float64) * 3 + 7
    my = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    w = masked_whiten(y, my)[my.bool()]
    assert w.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert w.var().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        masked_whiten(x, torch.ones(3))


def test_explained_variance():
    m = torch.tensor([1, 1, 1, 0])
    R = t(1.0, 2.0, 3.0, 50.0)
    assert explained_variance(t(1.0, 2.0, 3.0, -9.0), R, m).item() == pytest.approx(1.0)
    assert explained_variance(t(5.0, 5.0, 5.0, 0.0), R, m).item() == pytest.approx(0.0)
    # err = [0, 0, 1]: var 2/9; var R = 2/3  ->  1 - 1/3
    assert explained_variance(t(1.0, 2.0, 2.0, 0.0), R, m).item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- preference model

def test_bradley_terry_plain_margin_soft():
    rc, rr = t(1.0, 0.0, 3.0), t(0.0, 2.0, 1.0)  # differences 1, -2, 2
    loss, met = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(-(logsig(1) + logsig(-2) + logsig(2)) / 3)
    assert met["accuracy"].item() == pytest.approx(2 / 3)
    assert met["reward_margin"].item() == pytest.approx(1 / 3)
    assert met["chosen_reward"].item() == pytest.approx(4 / 3)
    assert met["rejected_reward"].item() == pytest.approx(1.0)
    # margin 1 on the first pair: d = 0 -> log 2
    assert bradley_terry_loss(t(1.0), t(0.0), margin=t(1.0))[0].item() == pytest.approx(math.log(2))
    # p = 0.5: -(0.5 log sig(d) + 0.5 log sig(-d)); at d = 0 that is log 2 too
    assert bradley_terry_loss(t(0.0), t(0.0), soft_labels=t(0.5))[0].item() == pytest.approx(math.log(2))
    d = 2.0
    want = -(0.8 * logsig(d) + 0.2 * logsig(-d))
    assert bradley_terry_loss(t(d), t(0.0), soft_labels=t(0.8))[0].item() == pytest.approx(want)
    assert bradley_terry_loss(t(d), t(0.0), soft_labels=t(1.0))[0].item() == pytest.approx(-logsig(d))
    with pytest.raises(ValueError, match="rejected_rewards"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


def test_bradley_terry_soft_label_gradient_vanishes_at_p():
    # d/dd of the soft loss is sigmoid(d) - p: zero where sigmoid(d) = p
    d = torch.tensor([math.log(0.7 / 0.3)], dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(d, torch.zeros(1, dtype=torch.float64), soft_labels=t(0.7))[0].backward()
    assert d.grad.item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- DPO / IPO

# policy chosen/rejected -1/-3, reference -2/-2: h = (1) - (-1) = 2
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_dpo_sigmoid_and_rewards():
    losses, cr, rj = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2))])
    assert cr.tolist() == pytest.approx([0.1]) and rj.tolist() == pytest.approx([-0.1])


def test_dpo_conservative_and_soft_labels():
    want = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(want)
    # soft labels p give eps = 1 - p per pair: p = 1 is plain DPO, p = 0.5 is symmetric, p = 0.9 is eps 0.1
    three = lambda x: x.repeat(3)
    losses = dpo_loss(three(PC), three(PR), three(RC), three(RR), beta=0.1, soft_labels=t(1.0, 0.5, 0.9))[0]
    half = 0.5 * (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2)))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), half, want])
    with pytest.raises(ValueError, match="not both"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.1, soft_labels=t(0.9))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_loss(PC, PR, RC, t(1.0, 2.0))


def test_ipo():
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")[0].item() == pytest.approx((2 - 5) ** 2)
    assert dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)
    # p = 0.75, beta = 0.5: 0.75 (2 - 1)^2 + 0.25 (-2 - 1)^2 = 3
    assert dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", soft_labels=t(0.75))[0].item() == pytest.approx(3.0)


def test_dpo_gradient_only_through_policy():
    pc = PC.clone().requires_grad_(); rc = RC.clone().requires_grad_()
    dpo_loss(pc, PR, rc, RR, beta=0.1)[0].sum().backward()
    # d/dlogp_c of -log sig(beta h) = -beta (1 - sig(beta h)) = -beta sig(-beta h)
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))
    assert rc.grad is None or rc.grad.abs().sum() == 0


# ----------------------------------------------------------------------------- PPO

def _ppo_case():
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    adv = [2.0, -1.0, 1.0, -1.0, 1.0]
    logp = torch.tensor([[math.log(r) for r in ratios] + [NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 6, dtype=torch.float64)
    A = torch.tensor([adv + [NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return ratios, logp, old, A, mask


def test_ppo_clip_hand_values_and_gradient():
    ratios, logp, old, A, mask = _ppo_case()
    loss, met = ppo_policy_loss(logp, old, A, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): -2.4 (clipped), 1.5, -0.5, 0.8 (clipped), -1.1
    assert loss.item() == pytest.approx((-2.4 + 1.5 - 0.5 + 0.8 - 1.1) / 5)
    assert met["clip_fraction"].item() == pytest.approx(2 / 5)
    assert met["ratio"].item() == pytest.approx(sum(ratios) / 5)
    assert met["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5)
    loss.backward()
    # d/dlogp of -A r is -A r; zero where the clipped term is active, and at padding
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5 / 5, -0.5 / 5, 0.0, -1.1 / 5, 0.0])


def test_ppo_padding_changes_nothing():
    _, logp, old, A, mask = _ppo_case()
    base = ppo_policy_loss(logp, old, A, mask)[0].item()
    logp2 = logp.detach().clone(); logp2[0, 5] = 50.0
    old2, A2 = old.clone(), A.clone(); old2[0, 5] = -50.0; A2[0, 5] = 1e6
    logp2.requires_grad_()
    loss2 = ppo_policy_loss(logp2, old2, A2, mask)[0]
    assert loss2.item() == pytest.approx(base)
    loss2.backward()
    assert logp2.grad[0, 5].item() == 0.0 and torch.isfinite(logp2.grad).all()


def test_ppo_ratio_one():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    A = t(0.5, -1.5, 2.0, 99.0)[None]
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, met = ppo_policy_loss(lp, lp.clone(), A, mask)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 + 2.0) / 3)
    assert met["clip_fraction"].item() == 0.0
    assert met["approx_kl"].item() == pytest.approx(0.0, abs=1e-15)
    assert met["ratio"].item() == pytest.approx(1.0)


def test_ppo_value_loss():
    v = torch.tensor([[1.0, 0.0, 2.0, NAN]], dtype=torch.float64, requires_grad=True)
    old = t(0.5, 0.5, 2.0, 7.0)[None]
    R = t(2.0, 1.0, 2.5, NAN)[None]
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, met = ppo_value_loss(v, old, R, mask, clip_eps=0.2)
    # token 0: v_clip 0.7, max(1, 1.69); token 1: v_clip 0.3, max(1, 0.49); token 2: 0.25
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.25) / 3)
    assert met["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 0 uses the clipped branch (v_clip is constant in v there): zero gradient; others (v - R) / 3
    assert v.grad[0].tolist() == pytest.approx([0.0, -1.0 / 3, -0.5 / 3, 0.0])


# ----------------------------------------------------------------------------- GAE

def test_gae_gamma_one():
    r, v = t(0.0, 0.0, 1.0)[None], t(0.5, 0.6, 0.7)[None]
    adv, ret = gae_advantages(r, v, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # deltas 0.1, 0.1, 0.3;  A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    a1 = 0.1 + 0.95 * 0.3
    a0 = 0.1 + 0.95 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.3])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, 1.0])
    # lam = 1, gamma = 1: returns are the Monte Carlo return (sum of future rewards)
    assert gae_advantages(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)[1][0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gae_discounted():
    r, v = t(0.0, 0.0, 1.0)[None], t(0.5, 0.6, 0.7)[None]
    adv, _ = gae_advantages(r, v, torch.ones(1, 3), gamma=0.9, lam=0.95)
    # deltas: 0.9*0.6 - 0.5 = 0.04, 0.9*0.7 - 0.6 = 0.03, 1 - 0.7 = 0.3; gamma*lam = 0.855
    a1 = 0.03 + 0.855 * 0.3
    assert adv[0].tolist() == pytest.approx([0.04 + 0.855 * a1, a1, 0.3])


def test_gae_right_padding():
    r = torch.tensor([[0.0, 0.0, 1.0, NAN], [0.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7, NAN], [0.5, 0.6, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=0.95)
    a1 = 0.1 + 0.95 * 0.3
    assert adv[0].tolist() == pytest.approx([0.1 + 0.95 * a1, a1, 0.3, 0.0])
    # row 1 ends after 2 tokens: delta1 = 1 - 0.6 = 0.4, delta0 = 0.6 - 0.5 = 0.1
    assert adv[1].tolist() == pytest.approx([0.1 + 0.95 * 0.4, 0.4, 0.0, 0.0])
    assert ret[1].tolist() == pytest.approx([0.98, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="right padded"):
        gae_advantages(r, v, torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]]))


# ----------------------------------------------------------------------------- KL-penalised rewards

def test_kl_penalized_rewards_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0, NAN], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0, -2.0, NAN], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rw = kl_penalized_rewards(t(5.0, -2.0), logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = [0.5, 0, -1]: -0.1 * k1, score 5 on token 2 (EOS); row 1 has no KL and its score on token 3
    assert rw[0].tolist() == pytest.approx([-0.05, 0.0, 0.1 + 5.0, 0.0])
    assert rw[1].tolist() == pytest.approx([0.0, 0.0, 0.0, -2.0])
    rw3 = kl_penalized_rewards(t(5.0, -2.0), logp, ref, mask, kl_coef=0.1, estimator="k3")
    k3 = [math.exp(d) - 1 - d for d in (-0.5, 0.0, 1.0)]  # d = ref - logp
    assert rw3[0].tolist() == pytest.approx([-0.1 * k3[0], 0.0, -0.1 * k3[2] + 5.0, 0.0])
    with pytest.raises(ValueError, match="no valid token"):
        kl_penalized_rewards(t(1.0, 1.0), logp, ref, torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalized_rewards(t(1.0, 1.0), logp, ref, mask, kl_coef=0.1, estimator="k2")


def test_k3_nonnegative():
    logp, ref = torch.randn(8, 16) * 3, torch.randn(8, 16) * 3
    rw = kl_penalized_rewards(torch.zeros(8), logp, ref, torch.ones(8, 16), kl_coef=1.0, estimator="k3")
    assert (rw <= 0).all()  # reward = -k3


# ----------------------------------------------------------------------------- KL controller

def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9: error 0.5 clipped to 0.2 -> 0.2 * (1 + 0.2 * 512 / 10000)
    assert c.update(9.0, 512) == pytest.approx(0.2 * 1.01024)
    # KL 5.4: error -0.1 -> times (1 - 0.1 * 1000 / 10000)
    assert c.update(5.4, 1000) == pytest.approx(0.2 * 1.01024 * 0.99)
    assert c.value == pytest.approx(0.2 * 1.01024 * 0.99)
    fixed = AdaptiveKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
