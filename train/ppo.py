"""RL-CAI with PPO: optimise the policy against the AI-feedback preference model (Bai et al. 2022, sec. 4).

Each step: sample one response per prompt from the policy (minicai.generate, plain temperature sampling:
no top-k/top-p, so the sampling distribution is the policy being optimised); score prompt + response with
the reward model; per-token reward = -beta * KL_t(pi || ref) at every token + the score at the last token
(Ziegler et al. 2019 eq. 2; the EOS carries the score); GAE advantages (Schulman et al. 2016), whitened;
then --ppo-epochs passes of clipped-surrogate PPO (Schulman et al. 2017 eq. 7) + clipped value loss over
minibatches. beta is fixed (--kl-coef) or adapted towards --kl-target (Ziegler et al. 2019 sec. 2.2).

Choices:
- Old log-probs and values are recomputed by the training forward (same minibatches as the first epoch,
  no gradient), not taken from the sampler: the sampler's incremental KV-cache forward differs from the
  full forward by rounding. So the PPO ratio is exactly 1 on the first minibatch of every batch (checked).
- Log-probs, entropies and the exact KL to the reference come from minicai.logprobs.token_logprobs on
  hidden states (never the [B, T, V] logits) at the sampling temperature (pi = softmax(logits / T)).
- Value head: Linear(H, 1) on the policy trunk (minicai.rl.ValueHead, shared trunk), with its own learning
  rate (--vf-lr-mult x lr, since it starts at zero); the value loss is weighted by --vf-coef.
- Reference = the initial policy (--model, normally the SFT checkpoint), loaded once more and frozen.
- A response that hits --max-new-tokens without EOS gets --no-eos-penalty subtracted from its score.
- Deterministic given --seed: prompt order, sampling seeds and minibatch order are functions of the step,
  so a resumed run continues exactly like an uninterrupted one (training state every --save-every steps).
- Inputs are all checked before anything is written; a fresh run over an earlier one in --out needs
  --overwrite. A NaN/inf or exactly-zero gradient norm stops the run and keeps the last good state
  (minicai.training.DivergenceGuard; the PPO loss has no uniform level, so the loss rules are off).

    python -m train.ppo --model runs/sft --reward-model runs/rm --out runs/ppo --steps 200
"""
import json
import os
import random
import time

import torch
import torch.nn as nn

from minicai import generate
from minicai import training
from minicai.checkpoint import resolve_device, save_pretrained
from minicai.io import append_jsonl
from minicai.losses import (AdaptiveKLController, explained_variance, gae_advantages, kl_k1, kl_k3, kl_penalized_rewards,
                            masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss)
from minicai.pretrained import load_model, resolve_path
from minicai.prompts import read_prompts
from minicai.rl import ValueHead, collate, response_logprobs, score_sequences, select_rows
from minicai.tokenizer import load_tokenizer

parser = training.script_parser(__doc__)
parser.add_argument("--model", default="default", help="initial policy and reference (the SL-CAI / SFT checkpoint)")
parser.add_argument("--reward-model", default=None, help="reward model directory (train.reward_model output); required")
parser.add_argument("--prompts", nargs="+", default=["data/red_team_prompts.jsonl", "data/helpful_prompts.jsonl"],
                    help="JSONL files with 'prompt' (string or messages) or 'messages'; all rows are mixed")
parser.add_argument("--out", default="runs/ppo", help="output directory: final/ (HF checkpoint), state/, log.jsonl, samples.jsonl, curves.png")
parser.add_argument("--steps", type=int, default=100, help="PPO steps (rollout batch + update each)")
parser.add_argument("--batch-size", type=int, default=8, help="prompts (= rollouts) per step")
parser.add_argument("--minibatch-size", type=int, default=4, help="rollouts per optimizer step inside a PPO epoch")
parser.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
parser.add_argument("--max-new-tokens", type=int, default=48, help="response length cap")
parser.add_argument("--max-prompt-tokens", type=int, default=384, help="prompts longer than this (chat-templated) are skipped, with a count")
parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; log-probs and KL use the same one")
parser.add_argument("--lr", type=float, default=3e-6, help="peak learning rate of the policy")
parser.add_argument("--vf-lr-mult", type=float, default=30.0, help="value head learning rate = this x --lr")
parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
parser.add_argument("--cliprange", type=float, default=0.2, help="PPO ratio clip epsilon")
parser.add_argument("--cliprange-value", type=float, default=0.2, help="value clip epsilon")
parser.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss (it also trains the shared trunk)")
parser.add_argument("--gamma", type=float, default=1.0, help="discount")
parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
parser.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty beta (initial value when adaptive)")
parser.add_argument("--kl-target", type=float, default=None, help="target sequence KL (nats) for the adaptive controller; unset = fixed beta")
parser.add_argument("--kl-horizon", type=int, default=10000, help="adaptive controller horizon (in rollouts)")
parser.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1", help="per-token KL estimator in the reward")
parser.add_argument("--classifier-reward", type=float, default=0.0,
                    help="add this x [the response classifier's class is the one the prompt's kind expects: refuse "
                         "harmful, comply benign] to the reward-model score (minicai.reward.VerdictReward; 0 = off)")
parser.add_argument("--classifier", choices=("head", "rules"), default="head",
                    help="classifier for --classifier-reward: head (validated, loads the default model) or rules")
parser.add_argument("--no-eos-penalty", type=float, default=1.0, help="subtracted from the score of responses without EOS (0 = off)")
training.add_train_flags(parser, min_lr_ratio=1.0, save_every=25, loss_jump=False)
parser.add_argument("--sample-every", type=int, default=10, help="print and save sample completions every N steps (0 = never)")
parser.add_argument("--stop-after", type=int, default=0, help="stop (state saved) after this many steps in this run; 0 = run to --steps")


def step_seed(seed, step, salt):
    return (seed * 1_000_003 + step * 7919 + salt) % (2 ** 62)


def prompt_indices(n_prompts, seed, step, batch_size) -> list:
    """Prompts of `step`: consecutive slices of one seeded shuffle per pass over the prompt set."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_prompts)
        out.append(random.Random(step_seed(seed, epoch, 1)).sample(range(n_prompts), n_prompts)[i])
    return out


def minibatches(n, size, seed, step, epoch) -> list:
    order = random.Random(step_seed(seed, step, 1000 + epoch)).sample(range(n), n)
    return [order[i:i + size] for i in range(0, n, size)]


def scatter_rows(full, rows, part):
    """full[rows, :width] = part, for a [b, width] sub-batch result."""
    full[torch.as_tensor(rows, device=full.device), :part.shape[1]] = part.to(full.dtype)


def rollout_forward(policy, value_head, ref, batch, minibatches_, args) -> tuple:
    """Old log-probs, reference log-probs, values, entropy and exact KL of the rollout [B, R] each, computed by
    the training forward over the first epoch's minibatches."""
    B, R = batch["response_mask"].shape
    full = {key: torch.zeros(B, R, device=args.device) for key in ("logprobs", "ref_logprobs", "values", "entropy", "kl")}
    for rows in minibatches_:
        # Grad mode on, as in the update below, so every kernel choice (e.g. SDPA's backend, which can
        # depend on whether a backward will follow) is the same: that is what makes the ratio exactly 1.
        out = response_logprobs(policy, select_rows(batch, rows), temperature=args.temperature, ref_model=ref,
                                value_head=value_head, with_entropy=True)
        for key, t in full.items():
            scatter_rows(t, rows, out[key].detach())
        del out  # frees this minibatch's graph
    return tuple(full.values())


def ppo_epochs(step, policy, value_head, opt, batch, plan, old, args, guard) -> list:
    """The clipped policy + value updates over the rollout batch's minibatches (plan: one list per epoch);
    old = (log-probs, values, advantages, returns) from the rollout. Returns each minibatch's stats."""
    dev = args.device
    old_logp, old_values, adv, returns = old
    stats = []
    for epoch, mbs in enumerate(plan):
        for k, rows in enumerate(mbs):
            sub = select_rows(batch, rows)
            m = sub["response_mask"]
            W = m.shape[1]
            r_idx = torch.as_tensor(rows, device=dev)
            out = response_logprobs(policy, sub, temperature=args.temperature, value_head=value_head)
            pl, pm = ppo_policy_loss(out["logprobs"], old_logp[r_idx, :W], adv[r_idx, :W], m, clip_eps=args.cliprange)
            vl, vm = ppo_value_loss(out["values"], old_values[r_idx, :W], returns[r_idx, :W], m,
                                    clip_eps=args.cliprange_value)
            if epoch == 0 and k == 0:  # nothing has been updated yet: new and old policy are the same forward
                gap = (torch.where(m, out["logprobs"], 0) - torch.where(m, old_logp[r_idx, :W], 0)).abs().max()
                if gap != 0:
                    raise RuntimeError(f"step {step}: PPO ratio != 1 before any update (max |log ratio| = "
                                       f"{float(gap):.3g}); the old log-probs must come from the same forward")
            loss = pl + args.vf_coef * vl
            loss.backward()
            gnorm = training.clip_and_step(opt, step, loss.detach(), args.grad_clip, guard)
            stats.append({"policy_loss": pl.detach(), "value_loss": vl.detach(), "grad_norm": gnorm, **pm, **vm})
    return stats


def ppo_step(step, policy, value_head, ref, reward_fn, opt, kl_ctl, prompts, tok, args, guard):
    """One rollout batch + its PPO update. Returns (metrics, sample completions)."""
    dev, pad = args.device, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    idx = prompt_indices(len(prompts), args.seed, step, args.batch_size)
    prompt_ids = [prompts[i]["ids"] for i in idx]

    # ---- rollout
    policy.eval()
    t0 = time.perf_counter()
    gens = generate(policy, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    stop_token_ids=[tok.eos_token_id], seed=step_seed(args.seed, step, 2), tokenizer=tok)
    t_generate = time.perf_counter() - t0  # the sampler alone: rollout_tok_s; rollout_s also holds the scoring
    responses = [g.tokens for g in gens]
    no_eos = torch.tensor([g.finish_reason != "stop_token" for g in gens], device=dev)
    batch = collate(prompt_ids, responses, pad, dev)
    score = score_sequences(reward_fn, prompt_ids, responses, pad, dev)                    # [B]
    shaped_score = score - args.no_eos_penalty * no_eos.float()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_rollout = time.perf_counter() - t0

    # ---- old log-probs, values, reference log-probs: the training forward, first epoch's minibatches
    t0 = time.perf_counter()
    policy.train()  # no dropout in our model; only gradient checkpointing looks at the flag
    B, R = batch["response_mask"].shape
    mask = batch["response_mask"]
    plan = [minibatches(B, args.minibatch_size, args.seed, step, e) for e in range(args.ppo_epochs)]
    old_logp, ref_logp, old_values, entropy, kl_exact = rollout_forward(policy, value_head, ref, batch, plan[0], args)
    with torch.no_grad():
        rewards = kl_penalized_rewards(shaped_score, old_logp, ref_logp, mask, kl_coef=kl_ctl.value,
                                       estimator=args.kl_estimator)                        # [B, R]
        adv, returns = gae_advantages(rewards, old_values, mask, gamma=args.gamma, lam=args.lam)
        adv = masked_whiten(adv, mask)
    # how far the sampler's (KV-cache) log-probs are from the training forward's: rounding only
    sampler_gap = max(abs(a - b) for r, g in enumerate(gens) for a, b in zip(g.logprobs, old_logp[r].tolist()))

    # ---- PPO epochs
    stats = ppo_epochs(step, policy, value_head, opt, batch, plan, (old_logp, old_values, adv, returns), args, guard)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_update = time.perf_counter() - t0

    # ---- metrics (k1 sequence KL drives the controller, as in Ziegler et al.)
    lengths = mask.sum(1).float()
    k1 = torch.where(mask, kl_k1(old_logp, ref_logp), 0)                                 # [B, R]
    seq_kl = k1.sum(1).mean()
    kl_coef = kl_ctl.value
    kl_ctl.update(float(seq_kl), B)
    n_tokens = int(batch["attention_mask"].sum())
    mean = lambda key: float(torch.tensor([float(s[key]) for s in stats]).mean())
    metrics = {
        "step": step + 1, "reward": float(score.mean()), "reward_std": float(score.std()) if B > 1 else 0.0,
        "shaped_score": float(shaped_score.mean()), "kl": float(seq_kl),
        "kl_exact": float(torch.where(mask, kl_exact, 0).sum(1).mean()),
        "kl_k3": float(torch.where(mask, kl_k3(old_logp, ref_logp), 0).sum(1).mean()),
        "kl_coef": kl_coef, "entropy": float(masked_mean(entropy, mask)),
        "non_score_reward": float((-kl_coef * k1).sum(1).mean()),
        "policy_loss": mean("policy_loss"), "value_loss": mean("value_loss"), "clip_fraction": mean("clip_fraction"),
        "approx_kl": mean("approx_kl"), "value_clip_fraction": mean("value_clip_fraction"),
        "grad_norm": mean("grad_norm"),
        "explained_variance": float(explained_variance(old_values, returns, mask)),
        "response_length": float(lengths.mean()), "no_eos_fraction": float(no_eos.float().mean()),
        "sampler_logprob_gap": sampler_gap,
        # the sampler's own speed (generated tokens / seconds in generate); rollout_s adds the reward model
        "rollout_tok_s": float(lengths.sum()) / max(t_generate, 1e-9),
        "update_tok_s": n_tokens * (args.ppo_epochs + 1) / max(t_update, 1e-9),
        "rollout_s": t_rollout, "update_s": t_update, "peak_mem_mb": training.peak_memory_mb(dev),
        "lr": opt.param_groups[0]["lr"],
    }
    samples = [{"step": step + 1, "prompt": prompts[i]["text"], "response": g.text, "score": float(s)}
               for i, g, s in zip(idx[:2], gens[:2], score[:2])]
    return metrics, samples


def show(m) -> str:
    return (f"step {m['step']:4d} | reward {m['reward']:+.3f} | kl {m['kl']:.4f} (beta {m['kl_coef']:.4f}) | ent "
            f"{m['entropy']:.2f} | clip {m['clip_fraction']:.3f} | approx_kl {m['approx_kl']:.2e} | pl {m['policy_loss']:+.4f} "
            f"vl {m['value_loss']:.4f} | ev {m['explained_variance']:+.2f} | len {m['response_length']:.1f} | "
            f"{m['rollout_tok_s']:.0f}/{m['update_tok_s']:.0f} tok/s | {m['peak_mem_mb']:.0f} MB")


def read_ppo_prompts(paths, classifier_reward) -> list:
    """minicai.prompts.read_prompts' rows; with the verdict reward each needs its kind (the reward routes by it)."""
    rows = read_prompts(paths, kinds="optional" if classifier_reward else None)
    missing = next((p for p in rows if classifier_reward and p["kind"] is None), None)
    if missing:
        raise ValueError(f"{missing['where']}: --classifier-reward needs each prompt's 'kind' or 'category' "
                         f"(harmful / legitimate)")
    return rows


def verdict_reward(score, tok, prompts, args):
    """The reward model's score plus the classifier's verdict bonus (minicai.reward.VerdictReward)."""
    from minicai.refusal_head import ResponseClassifier, load_classifier
    from minicai.reward import VerdictReward

    classifier = load_classifier(device=args.device) if args.classifier == "head" else ResponseClassifier()
    return VerdictReward(score, classifier, tok, [(p["ids"], p["text"], p["kind"]) for p in prompts],
                         args.classifier_reward)


def load_reward(args, policy, dtype):
    """The frozen reward model of --reward-model, which must share the policy's tokenizer."""
    from minicai.reward import load_reward_model

    if args.reward_model is None:
        raise ValueError("--reward-model is required (a train.reward_model output directory)")
    rm = load_reward_model(args.reward_model, dtype=dtype, device=args.device).requires_grad_(False)
    if rm.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"{args.reward_model}: vocab size {rm.config.vocab_size} differs from the policy's "
                         f"{policy.config.vocab_size} (the reward model must share the policy's tokenizer)")
    return rm


def encode_prompts(rows, tok, args, ctx) -> list:
    """[{ids, text, kind}] of the prompts that fit --max-prompt-tokens and, with a response, the context."""
    prompts = []
    for p in rows:
        ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True)
        if len(ids) <= args.max_prompt_tokens and len(ids) + args.max_new_tokens <= ctx:
            prompts.append({"ids": ids, "text": p["messages"][-1]["content"], "kind": p["kind"]})
    print(f"ppo: {len(prompts)} prompts ({len(rows) - len(prompts)} skipped: longer than --max-prompt-tokens or the context)")
    if not prompts:
        raise ValueError("no usable prompts")
    return prompts


def run(args, reward_fn=None):
    """The script on parsed flags; reward_fn(input_ids, attention_mask) -> [B] replaces --reward-model (tests
    pass a stub)."""
    training.check_flags(args, ge1="steps batch_size minibatch_size ppo_epochs max_new_tokens max_prompt_tokens",
                         pos="temperature lr vf_lr_mult kl_horizon", unit="min_lr_ratio gamma lam",
                         nonneg="save_every warmup weight_decay grad_clip cliprange cliprange_value vf_coef kl_coef kl_target "
                                "no_eos_penalty sample_every stop_after classifier_reward")
    if args.minibatch_size > args.batch_size:
        raise ValueError(f"--minibatch-size {args.minibatch_size} > --batch-size {args.batch_size}")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be >= 2 (advantages are whitened over the batch)")
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    resolve_device(args.device)
    log_path, state_dir = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "state")
    samples_path = os.path.join(args.out, "samples.jsonl")
    prompt_rows = read_ppo_prompts(args.prompts, args.classifier_reward)  # checked before anything is written
    path = resolve_path(args.model)
    tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token (PPO needs one to end responses)")
    policy = load_model(path, dtype=dtype, device=args.device)
    policy.gradient_checkpointing = args.gradient_checkpointing
    ref = load_model(path, dtype=dtype, device=args.device).requires_grad_(False).eval()
    reward_fn = load_reward(args, policy, dtype) if reward_fn is None else reward_fn
    prompts = encode_prompts(prompt_rows, tok, args, policy.config.max_position_embeddings)
    if args.classifier_reward:
        reward_fn = verdict_reward(reward_fn, tok, prompts, args)
    resuming = training.start_run(args.out, args, logs=("log.jsonl", "samples.jsonl", "curves.png"),
                                  outputs=(os.path.join(args.out, "final"),), run_flag="--out")
    guard = training.DivergenceGuard(state_dir, None, 0)

    value_head = ValueHead(policy.config.hidden_size).to(args.device)
    trainable = nn.ModuleDict({"policy": policy, "value_head": value_head})  # one module for save/load_resume_state
    opt = training.make_optimizer(policy, args.lr, weight_decay=args.weight_decay)
    opt.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0, "lr_mult": args.vf_lr_mult})
    kl_ctl = AdaptiveKLController(args.kl_coef, target=args.kl_target, horizon=args.kl_horizon)
    start, same = 0, {"prompts": training.digest(prompts)}  # a resume needs the same prompts (their order is the data's)
    if resuming:  # the logs lose the rows of steps after the saved state
        start, _, saved = training.resume_state(state_dir, trainable, opt, guard, [log_path, samples_path], name="ppo",
                                                same=same)
        kl_ctl.value = saved["kl_coef"]
    os.makedirs(args.out, exist_ok=True)

    def one_step(step, lr):  # one rollout batch and its PPO epochs (ppo_step); every --sample-every, samples
        metrics, samples = ppo_step(step, policy, value_head, ref, reward_fn, opt, kl_ctl, prompts, tok, args, guard)
        for s in samples if args.sample_every and (step + 1) % args.sample_every == 0 else ():
            append_jsonl(samples_path, s)
            print(f"  [sample, score {s['score']:+.3f}] {s['response']!r}")
        return metrics, None

    end = args.steps if not args.stop_after else min(args.steps, start + args.stop_after)
    step, _ = training.train_loop(one_step, trainable, opt, guard, start=start, end=end, log_path=log_path, show=show,
                                  schedule=dict(lr=args.lr, warmup=args.warmup, total=args.steps, min_ratio=args.min_lr_ratio),
                                  save_every=args.save_every, quiet=args.quiet,
                                  extra=lambda: {"kl_coef": kl_ctl.value, **same})
    rows = training.finish_log(log_path, step, os.path.join(args.out, "curves.png"), keys=("reward", "kl"), title="PPO")
    if end == args.steps:
        save_pretrained(policy.eval(), tok, os.path.join(args.out, "final"),
                        extra_files={"ppo_args.json": json.dumps(vars(args), indent=2)})
        print(f"ppo: saved {os.path.join(args.out, 'final')}")
    return rows


def main(argv=None, reward_fn=None):
    return run(parser.parse_args(argv), reward_fn)


if __name__ == "__main__":
    training.script_main(main, "train.ppo")
