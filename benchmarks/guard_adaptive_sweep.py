"""How stable is the adaptive attacker, and which guard setting leaks least to it? (the oracle only)

    python benchmarks/guard_adaptive_sweep.py --target demo|overfit --seeds 0 1 2 3 4 5
        [--configs default h.2 ...] [--models 5] [--diagnose]
        [--out benchmarks/results/guard_adaptive_sweep_TARGET.json]

Per seed, the set-up of :func:`siguard.privacy.experiments.prepare_seed` (target, owner's defender, shadow model
and shadow defender); per configuration, the float oracle (:func:`siguard.privacy.memguard.guard_reference`)
guards the target's 2 x 1000 outputs and the attacker's shadow outputs (its own defender, the same public
configuration), and ``--models`` attack models (ML-Leaks' neural attack, initialisations ``seed``, 100, 101, ...)
are fitted on the guarded shadow outputs. Reported: the non-adaptive neural attack's advantage; the single model
of seed ``seed``; the mean and spread of the single models' AUC; the bagged attacker's AUC (their mean score,
:class:`siguard.privacy.attacks.BaggedNeuralAttack`); acceptance and mean L1. The spread of one model's AUC over
initialisations alone (up to +-0.035 on a seed) is why the protection benchmark reports the bagged attacker.
``--diagnose`` adds where the signal lies (:func:`diagnose`): single features of the guarded outputs, the bag of
the protection benchmark's initialisations, and a gradient-boosted attacker without initialisation noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siguard.privacy.attacks import BaggedNeuralAttack, BoostedAttack, NeuralAttack  # noqa: E402
from siguard.privacy.defender import single_threaded  # noqa: E402
from siguard.privacy.experiments import TARGETS, seed_setups  # noqa: E402
from siguard.privacy.memguard import guard_reference  # noqa: E402

#: the search of the default (10 x 25, sign steps, hybrid validator with margin 0.2) without its last two parts; the
#: earlier rows vary it ("search only" was the default up to protocol v2)
P = {"schedule": "parallel", "step": "sign", "lr_growth": 1.3, "rounds": 10, "steps": 25, "lr": 0.04,
     "validator": "hybrid", "margin": 0.2}
CONFIGS = {
    # siguard.core.config.SCHEDULE_DEFAULTS["parallel"] (a test checks that they agree)
    "default": {**P, "sharpen_lr": 0.2, "sharpen_margin": 0.5, "release_bits": 7},
    "sharpen margin .2": {**P, "sharpen_lr": 0.2, "sharpen_margin": 0.2, "release_bits": 7},
    "search only": dict(P),
    "no rounding": {**P, "sharpen_lr": 0.2, "sharpen_margin": 0.5},
    "no sharpening": {**P, "release_bits": 7},
    "default, 2^-6": {**P, "sharpen_lr": 0.2, "sharpen_margin": 0.5, "release_bits": 6},
    "default, 2^-8": {**P, "sharpen_lr": 0.2, "sharpen_margin": 0.5, "release_bits": 8},
    "h.1": {**P, "margin": 0.1},
    "h.05": {**P, "margin": 0.05},
    "h.15": {**P, "margin": 0.15},
    "h.3": {**P, "margin": 0.3},
    "sign": {**P, "validator": "sign"},
    "margin .1": {**P, "validator": "margin", "margin": 0.1},
    "margin .2": {**P, "validator": "margin", "margin": 0.2},
    "lr.03 g1.4": {**P, "lr": 0.03, "lr_growth": 1.4},
    "12x25": {**P, "rounds": 12, "steps": 25},
    "16x20 g1.25": {**P, "rounds": 16, "steps": 20, "lr_growth": 1.25},
    "20x16 g1.2": {**P, "rounds": 20, "steps": 16, "lr_growth": 1.2},
    "c3 .3": {**P, "c3": 0.3},
    "10x30": {**P, "steps": 30},  # the default before this session's audit (README, "The guard")
    "10x25 .05": {**P, "lr": 0.05},
    "10x20 .06": {**P, "steps": 20, "lr": 0.06},
    "l2 .2 g1.1": {**P, "step": "l2", "lr": 0.2, "lr_growth": 1.1},
    "l2 .1 g1.3": {**P, "step": "l2", "lr": 0.1, "lr_growth": 1.3},
    "l2 sign .2": {**P, "step": "l2", "lr": 0.2, "lr_growth": 1.1, "validator": "sign"},
    "paper": {"schedule": "paper", "rounds": 6, "steps": 49, "lr": 0.2, "lr_growth": 1.1, "validator": "sign",
              "step": "l2"},
    "freeze-margin": {"schedule": "freeze", "rounds": 6, "steps": 49, "lr": 0.2, "lr_growth": 1.1,
                      "validator": "margin", "margin": 0.1, "step": "l2"},
}


def _log_top3(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.sort(probs, axis=1)[:, ::-1][:, :3], 1e-30))


def diagnose(guarded: np.ndarray, membership: np.ndarray, shadow_guarded: np.ndarray, shadow_membership: np.ndarray,
             seed: int, models: int) -> dict[str, float]:
    """Where the adaptive attacker's signal lies: the advantage |AUC - 0.5| of single features of the guarded
    outputs (no fitting: the statistic alone), of the bag drawn as the protection benchmark draws it, and of a
    gradient-boosted attacker fitted on the guarded shadow outputs' log sorted top-3 (no initialisation noise)."""
    from sklearn.metrics import roc_auc_score

    lt = _log_top3(guarded)
    adv = lambda score: abs(roc_auc_score(membership, score) - 0.5)  # noqa: E731
    bag = BaggedNeuralAttack(models=models, seed=seed).fit(shadow_guarded, shadow_membership)
    boosted = BoostedAttack().fit(shadow_guarded, shadow_membership)
    return {"diag_top1": adv(lt[:, 0]), "diag_log_q1_q2": adv(lt[:, 0] - lt[:, 1]),
            "diag_log_q2_q3": adv(lt[:, 1] - lt[:, 2]),
            "diag_bag_protection_seeds": bag.evaluate(guarded, membership).advantage,
            "diag_gbt_log_top3": boosted.evaluate(guarded, membership).advantage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=tuple(TARGETS), default="overfit")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--diagnose", action="store_true",
                    help="also: single-feature AUCs of the guarded outputs (top-1, log q1/q2, log q2/q3), a "
                         "second bag (initialisations seed .. seed + models - 1, as benchmarks/guard_protection.py "
                         "draws them) and a gradient-boosted attacker on the log of the sorted top-3")
    args = ap.parse_args(argv)
    rows = []
    with single_threaded():
        for s in seed_setups(args.target, args.seeds):
            seed = s.seed
            neural = NeuralAttack(seed=seed).fit(s.shadow.plain_outputs(), s.shadow.membership)
            for name in args.configs:
                opts, t = CONFIGS[name], time.time()
                res = guard_reference(s.logits, s.defender, seed=seed, **opts)
                shadow_guarded = s.shadow.adaptive_outputs(seed=seed + 1000, **opts).probs
                attack = BaggedNeuralAttack(seeds=[seed] + [100 + j for j in range(args.models - 1)])
                bag = attack.fit(shadow_guarded, s.shadow.membership).evaluate(res.guarded, s.membership).auc
                aucs = [r.auc for r in attack.single]
                row = {"target": args.target, "seed": seed, "config": name, "options": opts,
                       "neural_advantage": neural.evaluate(res.guarded, s.membership).advantage,
                       "adaptive_single_advantage": abs(aucs[0] - 0.5), "adaptive_models_auc": aucs,
                       "adaptive_bagged_auc": bag, "adaptive_bagged_advantage": abs(bag - 0.5),
                       "accepted": float(res.accepted.mean()),
                       "mean_l1": float(np.abs(res.guarded - s.plain).sum(1).mean()), "seconds": time.time() - t}
                if args.diagnose:
                    row.update(diagnose(res.guarded, s.membership, shadow_guarded, s.shadow.membership, seed,
                                        args.models))
                rows.append(row)
                print(f"{args.target} {seed} {name:14s} neural {row['neural_advantage']:.3f} one model "
                      f"{row['adaptive_single_advantage']:.3f} models {np.mean(aucs):.3f}±{np.std(aucs):.3f} bagged "
                      f"{bag:.3f} accepted {row['accepted']:.2f} L1 {row['mean_l1']:.3f}", flush=True)
                if args.diagnose:
                    print("    " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("diag_")),
                          flush=True)
    print()
    print(f"{'configuration':14s} {'worst bagged adv':>16s} {'mean':>6s} {'seeds > 0.03':>12s}")
    for name in args.configs:
        adv = [r["adaptive_bagged_advantage"] for r in rows if r["config"] == name]
        print(f"{name:14s} {max(adv):16.3f} {np.mean(adv):6.3f} {sum(a > 0.03 for a in adv):12d}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"guard_adaptive_sweep_{args.target}.json")
    out.write_text(json.dumps({"rows": rows, "models": args.models}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
