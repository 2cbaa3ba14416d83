"""A lead for the adaptive attacker, in the float oracle only: a defender on clipped log-ratios.

    python benchmarks/guard_logratio_defender.py [--target demo|overfit] [--seeds 1 2] [--clip 20] [--lr 0.1]
        [--out benchmarks/results/guard_logratio_defender.json]

Not in the product and not in MPC. The default guard's sign steps keep log(q2/q3) of the released vector, and
that is the adaptive attacker's signal (``benchmarks/guard_adaptive_sweep.py --diagnose``). Here the defender h
reads psi(u) = 1 + clip(u - u_l, -C, 0) / C (u the logits, l the label) instead of the probabilities, so its
gradient acts on the logit gaps of every class and the guard's steps change the tail's shape. The search is the
default's (10 candidates, sign steps, hybrid validator with margin 0.2, first success in (tier, round, step)
order) with dh/du in place of the softmax Jacobian's; the c3 term is the default's. In MPC psi needs no
exponential per step: a sign step changes every gap by a public multiple of a bit.

Per seed (the set-up of :func:`siguard.privacy.experiments.prepare_seed`): the owner's and the attacker's
log-ratio defenders, the target's and the shadow's guarded outputs, and the attackers of the protection
benchmark (non-adaptive neural; adaptive: the bag of five with the protection benchmark's initialisations and
the boosted trees), acceptance, mean L1 and log(q2/q3)'s advantage alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.privacy.attacks import BaggedNeuralAttack, BoostedAttack, NeuralAttack  # noqa: E402
from siguard.privacy.defender import DefenderWeights, single_threaded, train_defender  # noqa: E402
from siguard.privacy.experiments import TARGETS, seed_setups  # noqa: E402
from siguard.privacy.memguard import softmax  # noqa: E402


def psi(u: np.ndarray, clip: float) -> np.ndarray:
    """(B, k) 1 + clip(u - max u, -C, 0) / C: the label's gap 1, a class C or more below it 0."""
    return 1.0 + np.clip(u - u.max(axis=1, keepdims=True), -clip, 0.0) / clip


def train(z_members: np.ndarray, z_reference: np.ndarray, clip: float, seed: int) -> DefenderWeights:
    module, _ = train_defender(psi(z_members, clip), psi(z_reference, clip), seed=seed)
    return DefenderWeights.from_module(module)


def guard(z: np.ndarray, h: DefenderWeights, *, clip: float, lr: float, rounds: int = 10, steps: int = 25,
          growth: float = 1.3, margin: float = 0.2, c1: float = 1.0, c3: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The default search with the log-ratio defender: (released (B, k), accepted (B,))."""
    B, k = z.shape
    u0 = z - z.max(axis=1, keepdims=True)
    onehot = np.zeros((B, k))
    onehot[np.arange(B), z.argmax(axis=1)] = 1.0
    p = softmax(u0)
    a0 = h.score(psi(u0, clip))
    U0, P, OH, A0 = (np.concatenate([v] * rounds) for v in (u0, p, onehot, a0))
    lrs = np.repeat(lr * growth ** np.arange(rounds), B)[:, None]
    e = np.zeros_like(U0)
    tiers = ("sign", "margin")
    hits = [(np.zeros(len(U0), bool), np.zeros_like(U0)) for _ in tiers]
    for t in range(steps + 1):
        u = U0 + e
        ul = (u * OH).sum(axis=1, keepdims=True)
        a, m1, m2 = h.forward(psi(u, clip))
        viol = ((u > ul) & (OH == 0)).astype(np.float64)
        kept = viol.sum(axis=1) == 0
        for tier, (got, e_hit) in zip(tiers, hits, strict=True):
            now = kept & (A0 * a <= 0 if tier == "sign" else np.abs(a) <= margin) & ~got
            e_hit[now] = e[now]
            got |= now
        if t == steps:
            break
        gx = c1 * np.where(a >= 0, 1.0, -1.0)[:, None] * h.input_gradient(m1, m2)  # dh/dpsi
        gu = np.where(((u - ul) > -clip) & (OH == 0), gx / clip, 0.0)
        gu = gu - OH * gu.sum(axis=1, keepdims=True)  # d psi_j / d u_l = -1/C
        q = softmax(u)
        gq = c3 * np.where(q - P >= 0, 1.0, -1.0)
        gu = gu + q * gq - q * (q * gq).sum(axis=1, keepdims=True)
        hinge = viol - OH * viol.sum(axis=1, keepdims=True)
        e = e - lrs * np.where(hinge != 0, np.sign(hinge), np.where(gu < 0, -1.0, 1.0))
    e_star, accepted = np.zeros((B, k)), np.zeros(B, bool)
    for got, e_hit in hits:
        for r in range(rounds):
            rows = slice(r * B, (r + 1) * B)
            now = got[rows] & ~accepted
            e_star[now] = e_hit[rows][now]
            accepted |= now
    return softmax(u0 + e_star), accepted


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=tuple(TARGETS), default="demo")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--clip", type=float, default=20.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with single_threaded():
        for s in seed_setups(args.target, args.seeds):
            seed, n = s.seed, int(s.membership.sum())
            sh = s.shadow
            h = train(s.logits[:n], s.reference_logits, args.clip, seed)
            h_shadow = train(sh.logits[sh.membership], sh.reference_logits, args.clip, seed + 1000)
            released, accepted = guard(s.logits, h, clip=args.clip, lr=args.lr)
            shadow_released, _ = guard(sh.logits, h_shadow, clip=args.clip, lr=args.lr)
            m = s.membership
            top = np.log(np.maximum(-np.sort(-released, axis=1)[:, :3], 1e-30))
            row = {"target": args.target, "seed": seed, "clip": args.clip, "lr": args.lr,
                   "neural_advantage": NeuralAttack(seed=seed).fit(sh.plain_outputs(), sh.membership)
                   .evaluate(released, m).advantage,
                   "adaptive_bagged_advantage": BaggedNeuralAttack(models=5, seed=seed)
                   .fit(shadow_released, sh.membership).evaluate(released, m).advantage,
                   "adaptive_boosted_advantage": BoostedAttack().fit(shadow_released, sh.membership)
                   .evaluate(released, m).advantage,
                   "log_q2_q3_advantage": abs(roc_auc_score(m, top[:, 1] - top[:, 2]) - 0.5),
                   "accepted": float(accepted.mean()), "mean_l1": float(np.abs(released - s.plain).sum(1).mean()),
                   "labels_kept": float((released.argmax(1) == s.logits.argmax(1)).mean())}
            rows.append(row)
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "guard_logratio_defender.json")
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
