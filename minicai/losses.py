"""Loss math for the RL stage of Constitutional AI (Bai et al. 2022, "RL from AI Feedback").

Every loss of the preference-model and RL stages lives here once, as a pure function on tensors; the
scripts in train/ only plumb. Papers and equations:

- preference model: Bradley-Terry loss (Ouyang et al. 2022 eq. 1), with a margin (Touvron et al. 2023,
  Llama 2, eq. 2) and with soft labels from the AI feedback model (Bai et al. 2022 CAI sec. 4.1);
- DPO (Rafailov et al. 2023 eq. 7), conservative DPO / label smoothing (Mitchell 2023, "A note on DPO
  with noisy preferences"), IPO (Azar et al. 2023 eq. 17);
- PPO clipped surrogate (Schulman et al. 2017 eq. 7), value clipping (OpenAI baselines ppo2, as used by
  Ziegler et al. 2019), GAE (Schulman et al. 2016 eq. 16), the per-token KL-penalised reward (Ziegler et
  al. 2019 eq. 2, Stiennon et al. 2020 eq. 1) and its adaptive coefficient (Ziegler et al. 2019 sec. 2.2);
- the sampled-token KL estimators k1 / k2 / k3 (Schulman 2020), once: the reward's kl_t, PPO's approx_kl and
  its logged KL all call them.

Layout for per-token tensors: [B, T] over the *response* tokens only, right padded: mask[b, t] = 1 for
real response tokens (a prefix of each row), 0 after. Padded positions never affect a result, whatever
value they hold (inf and nan included), because they are selected away with torch.where, not multiplied.

Deliberate choices: metrics are returned as detached 0-d tensors (no host sync here); quantities that
must be constants (old log-probs, advantages, targets) are detached inside the losses so a caller cannot
leak gradient through them by accident.
"""

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- masked statistics

def _check_mask(x, mask, name="x"):
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    return mask.bool()


def _check_right_padded(mask):
    m = mask.bool()
    if m.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("mask must be right padded (1s then 0s in every row)")
    return m


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is true: sum(x * m) / sum(m). Empty selections give 0."""
    m = _check_mask(x, mask)
    s = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    n = m.sum() if dim is None else m.sum(dim)
    return s / n.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over valid positions; padded positions come back as 0.

    The variance is the unbiased one (Bessel's correction, n - 1), like torch.var. With shift_mean=False
    the mean is added back (only the scale changes), as is usual for rewards.
    """
    m = _check_mask(x, mask)
    x = torch.where(m, x, 0)  # sanitise padding first so nan/inf there cannot reach the backward pass
    n = m.sum()
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 valid positions, got {int(n)}")
    mean = masked_mean(x, m)
    var = torch.where(m, (x - mean) ** 2, 0).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over valid positions (1 = perfect critic, 0 = predicts the mean). NaN if Var[R] = 0."""
    m = _check_mask(values, mask, "values")
    values, returns = values.detach(), returns.detach()
    var_r = masked_mean((returns - masked_mean(returns, m)) ** 2, m)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, m)) ** 2, m)
    return torch.where(var_r > 0, 1 - var_e / var_r, torch.full_like(var_r, float("nan")))


# ----------------------------------------------------------------------------- preference model

def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, soft_labels=None):
    """Preference-model loss; returns (mean loss, metrics).

    Hard labels (Ouyang et al. 2022 eq. 1), margin m as in Llama 2 (Touvron et al. 2023 eq. 2):
        d = r_c - r_r - m,    loss = -log sigmoid(d)
    Soft labels p = P(chosen preferred), e.g. the feedback model's normalised probabilities (Bai et al.
    2022 sec. 4.1), make it the cross-entropy against the Bradley-Terry probability sigmoid(d):
        loss = -[p log sigmoid(d) + (1 - p) log sigmoid(-d)]
    Shapes: chosen_rewards, rejected_rewards, margin, soft_labels: [B].
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must both be [B]")
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    if soft_labels is None:
        losses = -F.logsigmoid(d)
    else:
        p = soft_labels.to(d.dtype)
        losses = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    with torch.no_grad():
        raw = chosen_rewards - rejected_rewards
        metrics = {"accuracy": (raw > 0).float().mean(), "reward_margin": raw.mean(),
                   "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean()}
    return losses.mean(), metrics


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, soft_labels=None):
    """Direct preference optimisation; returns (losses [B], chosen_rewards [B], rejected_rewards [B]).

    All inputs are sequence log-probabilities [B]. With h = (logp_c - ref_c) - (logp_r - ref_r):
      "sigmoid" (DPO, Rafailov et al. 2023 eq. 7):   l(h) = -log sigmoid(beta h)
      "ipo"     (IPO, Azar et al. 2023 eq. 17):      l(h) = (h - 1 / (2 beta))^2
                IPO is usually run on length-averaged log-probs; that is the caller's choice.
    Noisy labels (conservative DPO, Mitchell 2023): each pair is flipped with probability eps,
        loss = (1 - eps) l(h) + eps l(-h),
    eps = label_smoothing for all pairs, or eps = 1 - p per pair from soft_labels p = P(chosen preferred).
    For IPO the same mixture moves the target of h to (2p - 1) / (2 beta).
    Rewards are the implicit ones, beta (logp - ref_logp), detached (for logging / accuracy).
    """
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss inputs must all be [B], got shapes {sorted(shapes)}")
    if soft_labels is not None and label_smoothing:
        raise ValueError("give label_smoothing or soft_labels, not both")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    h = (policy_chosen_logps - ref_chosen_logps.detach()) - (policy_rejected_logps - ref_rejected_logps.detach())
    if loss_type == "sigmoid":
        def ell(x): return -F.logsigmoid(beta * x)
    elif loss_type == "ipo":
        def ell(x): return (x - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    eps = label_smoothing if soft_labels is None else 1 - soft_labels.to(h.dtype)
    losses = (1 - eps) * ell(h) + eps * ell(-h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- PPO

def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2):
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7, L^CLIP), as a loss to minimise; returns (loss, metrics).

        r_t = exp(logp_t - logp_old_t),   loss = masked_mean( max(-A_t r_t, -A_t clip(r_t, 1-eps, 1+eps)) )
    metrics: clip_fraction (share of tokens where the clipped term is the active one, so their gradient is
    zero), approx_kl = masked mean of the k3 estimator of KL(old || new), (r - 1) - log r (Schulman 2020,
    "Approximating KL divergence"), ratio (mean r).
    """
    m = _check_mask(logprobs, mask, "logprobs")
    # Zero the padding of every input up front: a nan there would otherwise leak into the backward pass.
    log_ratio = torch.where(m, logprobs, 0) - torch.where(m, old_logprobs.detach(), 0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), 0)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        metrics = {"clip_fraction": masked_mean((clipped > unclipped).float(), m),
                   "approx_kl": masked_mean(kl_k3(torch.zeros_like(log_ratio), log_ratio), m),  # r = new / old
                   "ratio": masked_mean(ratio, m)}
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2):
    """Clipped value loss (OpenAI baselines ppo2; used by Ziegler et al. 2019's lm-human-preferences).

        v_clip = v_old + clip(v - v_old, -eps, eps),   loss = 0.5 masked_mean( max((v - R)^2, (v_clip - R)^2) )
    Returns (loss, metrics) with value_clip_fraction (share of tokens where the clipped error is larger).
    """
    m = _check_mask(values, mask, "values")
    values = torch.where(m, values, 0)  # padding zeroed up front, as in ppo_policy_loss
    old, ret = torch.where(m, old_values.detach(), 0), torch.where(m, returns.detach(), 0)
    v_clip = old + (values - old).clamp(-clip_eps, clip_eps)
    err, err_clip = (values - ret) ** 2, (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), m)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean((err_clip > err).float(), m)}
    return loss, metrics


@torch.no_grad()
def gae_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016 eq. 16); returns (advantages, returns), [B, T].

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t
    computed backwards. Each row is one episode over its valid (right-padded) response tokens; the value
    after the last valid token is 0 (the episode ends at EOS). Padded positions come back as 0.
    """
    m = _check_right_padded(mask)
    if rewards.shape != m.shape or values.shape != m.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(m.shape)} must have the same [B, T] shape")
    r, v = torch.where(m, rewards, 0), torch.where(m, values, 0)
    adv = torch.zeros_like(v)
    next_v = next_adv = torch.zeros_like(v[:, 0])  # both 0 past the end of a row
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        adv[:, t] = torch.where(m[:, t], delta + gamma * lam * next_adv, 0)
        next_v, next_adv = v[:, t], adv[:, t]
    return adv, torch.where(m, adv + v, 0)


# Sampled-token KL estimators. With x ~ p (the policy sampled the token), logp = log p(x) and
# ref_logp = log q(x), each is an estimate of KL(p || q) per token; average them over tokens.
# Source for all three: John Schulman, "Approximating KL Divergence" (blog post, 2020).

def kl_k1(logp, ref_logp):
    """k1 = log p(x) - log q(x) = -log r, r = q/p. Unbiased, high variance, can be negative (Schulman 2020)."""
    return logp - ref_logp


def kl_k2(logp, ref_logp):
    """k2 = 0.5 (log p(x) - log q(x))^2. Biased but low variance, never negative (Schulman 2020)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp, ref_logp):
    """k3 = (r - 1) - log r with r = q(x)/p(x). Unbiased, low variance, never negative since
    log r <= r - 1 (Schulman 2020). Clamped at 0 against rounding."""
    log_r = ref_logp - logp
    return (torch.expm1(log_r) - log_r).clamp_min(0)


@torch.no_grad()
def kl_penalized_rewards(score, logprobs, ref_logprobs, mask, *, kl_coef, estimator="k1"):
    """Per-token RL reward (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020 eq. 1), [B, T].

        reward_t = -kl_coef * kl_t  at every valid token,  + score  (the preference model's, [B]) at the
    last valid token (the EOS that closes the response carries the sequence reward). kl_t is "k1",
    logp - ref_logp, or "k3", (ref/pi - 1) - log(ref/pi), per-token estimators of KL(pi || ref).
    """
    m = _check_right_padded(mask)
    if logprobs.shape != m.shape or ref_logprobs.shape != m.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
                         f"must match mask {tuple(m.shape)}")
    if score.shape != m.shape[:1]:
        raise ValueError(f"score must be [B] = [{m.shape[0]}], got {tuple(score.shape)}")
    lengths = m.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"rows {lengths.eq(0).nonzero().flatten().tolist()} of mask have no valid token")
    kl_fn = {"k1": kl_k1, "k3": kl_k3}.get(estimator)
    if kl_fn is None:
        raise ValueError(f"estimator {estimator!r}: expected 'k1' or 'k3'")
    rewards = torch.where(m, -kl_coef * kl_fn(logprobs, ref_logprobs), 0)
    rewards[torch.arange(m.shape[0], device=m.device), lengths - 1] += score.to(rewards.dtype)
    return rewards


class AdaptiveKLController:
    """KL coefficient controller (Ziegler et al. 2019 sec. 2.2); target=None keeps it fixed.

        e_t = clip(KL_t / target - 1, -0.2, 0.2),    beta <- beta (1 + e_t n / horizon)
    with n the number of samples (episodes) since the last update: n / horizon is the paper's K_beta.
    """

    def __init__(self, init_kl_coef, target=None, horizon=10000):
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be positive")
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl, n_steps):
        if self.target is not None:
            err = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
            self.value *= 1 + err * n_steps / self.horizon
        return self.value
