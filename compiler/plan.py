"""The plan: a versioned, hashed JSON document (public) plus a weights file (model owner only).

A plan directory holds

* ``plan.json`` -- the public plan: inputs, outputs, value table (shapes, scales, visibility),
  public constants, the ordered steps with their implementation and cost, totals, what each
  pass changed, and ``plan_hash``: SHA-256 over the canonical JSON of everything else. All
  parties compare this hash at handshake so they provably run the same plan.
* ``weights.npz`` -- the model owner's float weights, tagged with the plan hash they belong to.
  Only the model owner's server reads it (and secret-shares it); it is never part of the hash.
* ``report.txt`` / ``report.html`` / ``plan.dot`` -- human renderings (see :mod:`siguard.compiler.report`).

Loading validates the document against ``schema/plan.schema.json`` and recomputes the hash;
a plan is data and loading it never executes code from it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from siguard.core.errors import PlanError

__all__ = ["Plan", "PLAN_FORMAT", "PLAN_VERSION", "PROTOCOL", "PROTOCOL_VERSION", "compute_hash"]

PLAN_FORMAT = "siguard-plan"
PLAN_VERSION = 1
PROTOCOL = "rss3-z2^64-semihonest"
PROTOCOL_VERSION = 1
_HASH_KEY = "__plan_hash__"


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "plan_hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_hash(doc: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the plan without its ``plan_hash`` field."""
    return hashlib.sha256(_canonical(doc)).hexdigest()


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "schema" / "plan.schema.json").read_text())


class Plan:
    """A loaded, validated plan. ``doc`` is the JSON document; ``directory`` where it lives."""

    def __init__(self, doc: dict[str, Any], directory: Path | None = None):
        self.doc = doc
        self.directory = directory

    # ---- accessors ----------------------------------------------------------------------------
    @property
    def plan_hash(self) -> str:
        return self.doc["plan_hash"]

    @property
    def frac_bits(self) -> int:
        return int(self.doc["frac_bits"])

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.doc["steps"]

    @property
    def values(self) -> dict[str, dict[str, Any]]:
        return self.doc["values"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.doc["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.doc["outputs"]

    @property
    def totals(self) -> dict[str, Any]:
        return self.doc["totals"]

    # ---- validation -----------------------------------------------------------------------------
    @staticmethod
    def validate(doc: dict[str, Any], where: str = "plan") -> None:
        """Raise PlanError unless ``doc`` is a well-formed plan of this version with a valid hash."""
        import jsonschema

        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise PlanError(f"{where}: not a SIGuard plan (missing format marker)")
        if doc.get("version") != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {doc.get('version')!r} is not supported (expected {PLAN_VERSION})")
        try:
            jsonschema.validate(doc, _schema())
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise PlanError(f"{where}: schema violation at {path}: {exc.message}") from None
        actual = compute_hash(doc)
        if actual != doc["plan_hash"]:
            raise PlanError(
                f"{where}: plan hash mismatch (recorded {doc['plan_hash'][:16]}..., content {actual[:16]}...): "
                "the plan was modified after compilation"
            )
        Plan._check_references(doc, where)

    @staticmethod
    def _check_references(doc: dict[str, Any], where: str) -> None:
        known = set(doc["constants"]) | {w["name"] for w in doc["weights"]}
        values = doc["values"]
        for i, step in enumerate(doc["steps"]):
            for name in step["inputs"]:
                if name not in known:
                    raise PlanError(f"{where}: step {i} '{step['name']}' reads {name!r} before it is produced")
            for name in step["outputs"]:
                if name not in values:
                    raise PlanError(f"{where}: step {i} '{step['name']}' writes undeclared value {name!r}")
                known.add(name)

    # ---- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> Plan:
        """Load and validate ``directory/plan.json`` (or a path to the JSON file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / "plan.json"
        if not path.exists():
            raise PlanError(f"no plan at {path}")
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        cls.validate(doc, str(path))
        return cls(doc, path.parent)

    def save(self, directory: str | Path, weights: dict[str, np.ndarray] | None = None) -> Path:
        """Write ``plan.json`` (with a fresh hash) and, if given, ``weights.npz``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.doc["plan_hash"] = compute_hash(self.doc)
        (d / "plan.json").write_text(json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
        if weights is not None:
            arrays = {k: np.asarray(v) for k, v in weights.items()}
            arrays[_HASH_KEY] = np.array(self.plan_hash)
            np.savez(d / "weights.npz", **arrays)
        self.directory = d
        return d

    def load_weights(self, path: str | Path | None = None) -> dict[str, np.ndarray]:
        """The model owner's weights, checked against this plan (hash, names, shapes, finiteness)."""
        p = Path(path) if path is not None else (self.directory or Path(".")) / "weights.npz"
        if not p.exists():
            raise PlanError(f"no weights file at {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # a corrupt zip/npy: one line, no traceback
            raise PlanError(f"{p}: cannot read weights ({exc})") from None
        tag = str(arrays.pop(_HASH_KEY, ""))
        if tag != self.plan_hash:
            raise PlanError(
                f"{p}: weights belong to plan {tag[:16] or '?'}..., not to this plan {self.plan_hash[:16]}..."
            )
        for w in self.doc["weights"]:
            a = arrays.get(w["name"])
            if a is None:
                raise PlanError(f"{p}: weight {w['name']!r} missing")
            if list(a.shape) != list(w["shape"]):
                raise PlanError(f"{p}: weight {w['name']!r} has shape {list(a.shape)}, plan says {w['shape']}")
            if not np.all(np.isfinite(a)):
                raise PlanError(f"{p}: weight {w['name']!r} contains NaN or infinity")
        return arrays
