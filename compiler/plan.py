"""The plan: a versioned, hashed JSON document (public) plus a weights file (model owner only).

A plan directory holds

* ``plan.json`` -- the public plan: inputs, outputs, value table (shapes, scales, visibility),
  public constants, the ordered steps with their implementation and cost, totals, what each
  pass changed, and ``plan_hash``: SHA-256 over the canonical JSON of everything else. All
  parties compare this hash at handshake so they provably run the same plan.
* ``weights.npz`` -- the model owner's float weights, tagged with the plan hash they belong to.
  Only the model owner's server reads it (and secret-shares it); it is never part of the hash.
* ``owner.json`` -- facts measured on the model owner's data, kept out of the public plan
  (:data:`OWNER_FACTS`): calibrated value ranges, the approximation pass's fitted ranges and
  measured errors, the model file's name and SHA-256, compile timings and warnings. Tagged with the
  plan hash like the weights; only the owner has it. ``siguard inspect`` merges it in when present.
* ``report.txt`` / ``report.html`` / ``plan.dot`` -- human renderings (see :mod:`siguard.compiler.report`),
  with the owner's facts: they are the owner's documents too.

Loading validates the document against ``schema/plan.schema.json`` and recomputes the hash;
a plan is data and loading it never executes code from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from siguard.core.errors import PlanError

from .impl import Impl
from .step import PlanStep

__all__ = [
    "Plan", "PlanStep", "Impl", "PLAN_FORMAT", "PLAN_VERSION", "PROTOCOL", "PROTOCOL_VERSION", "OWNER_FACTS",
    "OWNER_FILE", "compute_hash", "split_owner_facts", "merge_owner_facts",
]

PLAN_FORMAT = "siguard-plan"
PLAN_VERSION = 1
PROTOCOL = "rss3-z2^64-semihonest"
#: 2: the guard's sign tests on bounded operands and its shorter step and final phase (1,050 rounds per query at
#: 10 x 25): a guarded plan of version 1 describes messages and costs the parties no longer send, so it is
#: refused (recompile it); the other protocols are unchanged, so a version-1 plan without a guard still loads.
#: 3: the guard's sharpening round and its rounded release (1,060 rounds per query): a guarded plan of version 1 or
#: 2 is refused in the same way
PROTOCOL_VERSION = 3
_COMPATIBLE_UNGUARDED = (1, 2, 3)
_HASH_KEY = "__plan_hash__"
OWNER_FILE = "owner.json"
OWNER_FORMAT = "siguard-owner-facts"

#: what moves from plan.json to owner.json (derived from the owner's model file or calibration data)
OWNER_FACTS = (
    "values.*.range",  # calibrated min/max of every intermediate (logits included)
    "steps.*.approx.range",  # the range an approximation was fitted on (before coarsening)
    "steps.*.approx.error",  # errors measured on the calibration data
    "steps.*.approx.bounds",  # why the bounds pass changed an approximation, quoting weight-derived bounds
    "passes.bounds.changes",  # the bounds pass's notes quote the same bounds (a count stays public)
    "approximation.measured",  # end-to-end error of the chosen plan on the calibration data
    "model.source",  # the model file's name
    "model.source_sha256",  # a commitment to the owner's model file (would confirm a guessed model)
    "passes.*.seconds",  # compile timings (the search's time depends on the data)
    "warnings",  # headroom and calibration warnings quote measured ranges
)


def split_owner_facts(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public document, owner facts): a copy of ``doc`` with every :data:`OWNER_FACTS` entry
    nulled (or removed, for the model's source fields and timings), and those entries."""
    pub = copy.deepcopy(doc)
    facts: dict[str, Any] = {"values": {}, "steps": {}, "approximation": {}, "model": {}, "passes": [],
                             "warnings": []}
    for name, v in pub.get("values", {}).items():
        if v.get("range") is not None:
            facts["values"][name] = v["range"]
            v["range"] = None
    for step in pub.get("steps", []):
        a = step.get("approx")
        if a:
            moved = {k: a[k] for k in ("range", "error", "bounds") if a.get(k) is not None}
            if moved:
                facts["steps"][step["name"]] = moved
                a.update({k: None for k in moved})
    appr = pub.get("approximation")
    if appr and appr.get("measured") is not None:
        facts["approximation"]["measured"] = appr["measured"]
        appr["measured"] = None
    for k in ("source", "source_sha256"):
        if k in pub.get("model", {}):
            facts["model"][k] = pub["model"].pop(k)
    seconds = [p.pop("seconds", None) for p in pub.get("passes", [])]
    facts["passes"] = seconds if any(x is not None for x in seconds) else []
    for p in pub.get("passes", []):
        if p.get("name") == "bounds" and p.get("changes"):
            facts["bounds_changes"], n = p["changes"], len(p["changes"])
            p["changes"] = [f"{n} change(s) to fit the bounds derived from the weights (in owner.json; each input's "
                            "domain is in inputs)"]
    facts["warnings"], pub["warnings"] = list(pub.get("warnings", [])), []
    return pub, facts


def merge_owner_facts(doc: dict[str, Any], facts: dict[str, Any] | None) -> dict[str, Any]:
    """The inverse of :func:`split_owner_facts`: a copy of ``doc`` with ``facts`` put back."""
    full = copy.deepcopy(doc)
    if not facts:
        return full
    for name, rng in facts.get("values", {}).items():
        if name in full["values"]:
            full["values"][name]["range"] = rng
    for step in full["steps"]:
        if step["name"] in facts.get("steps", {}) and step.get("approx"):
            step["approx"].update(facts["steps"][step["name"]])
    if "measured" in facts.get("approximation", {}) and "approximation" in full:
        full["approximation"]["measured"] = facts["approximation"]["measured"]
    full["model"].update(facts.get("model", {}))
    for p, sec in zip(full.get("passes", []), facts.get("passes", []), strict=False):
        if sec is not None:
            p["seconds"] = sec
    for p in full.get("passes", []):
        if p.get("name") == "bounds" and facts.get("bounds_changes"):
            p["changes"] = list(facts["bounds_changes"])
    full["warnings"] = list(facts.get("warnings", [])) or full.get("warnings", [])
    return full


def _has_facts(facts: dict[str, Any]) -> bool:
    return any(bool(v) for v in facts.values())


def _step_json(obj: Any) -> Any:
    """json.dumps' hook: a :class:`PlanStep` is written as its JSON entry."""
    if isinstance(obj, PlanStep):
        return obj.to_dict()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "plan_hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_step_json).encode()


def compute_hash(doc: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the plan without its ``plan_hash`` field (steps may be
    :class:`PlanStep` objects or their JSON entries: the hash is the same)."""
    return hashlib.sha256(_canonical(doc)).hexdigest()


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "schema" / "plan.schema.json").read_text())


@lru_cache(maxsize=1)
def _validator() -> Any:
    """The schema's validator, built (and the schema itself checked) once per process."""
    import jsonschema

    cls = jsonschema.validators.validator_for(_schema())
    cls.check_schema(_schema())
    return cls(_schema())


class Plan:
    """A loaded, validated plan. ``doc`` is the document with its ``steps`` as :class:`PlanStep` objects
    (:meth:`to_dict` is the JSON document itself); ``directory`` where it lives."""

    def __init__(self, doc: dict[str, Any], directory: Path | None = None, owner: dict[str, Any] | None = None):
        # the top level is copied so that the caller's dict keeps its JSON steps; the entries are shared
        self.doc = {k: ([_as_step(s) for s in v] if k == "steps" else v) for k, v in doc.items()}
        self.directory = directory
        #: the owner's facts (owner.json) where available, else None; see :data:`OWNER_FACTS`
        self.owner = owner

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (steps as their JSON entries, keys in the order of plan.json)."""
        return {k: ([s.to_dict() for s in v] if k == "steps" else v) for k, v in self.doc.items()}

    def with_owner_facts(self) -> Plan:
        """This plan with the owner's facts merged back in (for reports); itself if there are none."""
        if not self.owner:
            return self
        return Plan(merge_owner_facts(self.to_dict(), self.owner), self.directory, self.owner)

    # ---- accessors ----------------------------------------------------------------------------
    @property
    def plan_hash(self) -> str:
        return self.doc["plan_hash"]

    @property
    def frac_bits(self) -> int:
        return int(self.doc["frac_bits"])

    @property
    def steps(self) -> list[PlanStep]:
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
        exc = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
        if exc is not None:
            path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise PlanError(f"{where}: schema violation at {path}: {exc.message}") from None
        version = doc["protocol_version"]
        guarded = any(step.get("op") == "guard" for step in doc["steps"])
        if version != PROTOCOL_VERSION and (guarded or version not in _COMPATIBLE_UNGUARDED):
            raise PlanError(
                f"{where}: compiled for protocol {doc['protocol']} v{version}, this SIGuard runs v{PROTOCOL_VERSION}"
                + (" (the guard's protocol changed)" if guarded else "") + ": recompile the plan"
            )
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
        return cls(doc, path.parent, _load_owner_facts(path.parent / OWNER_FILE, doc["plan_hash"]))

    def save(self, directory: str | Path, weights: dict[str, np.ndarray] | None = None) -> Path:
        """Write ``plan.json`` (the public part, with a fresh hash), ``owner.json`` (the owner's facts,
        moved out of the document: see :data:`OWNER_FACTS`) and, if given, ``weights.npz``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        public, facts = split_owner_facts(self.to_dict())
        if _has_facts(facts):
            self.doc, self.owner = Plan(public).doc, facts
        self.doc["plan_hash"] = compute_hash(self.doc)
        (d / "plan.json").write_text(json.dumps(self.doc, indent=1, allow_nan=False, default=_step_json) + "\n")
        if self.owner:
            owner_doc = {"format": OWNER_FORMAT, "plan_hash": self.plan_hash, **self.owner}
            (d / OWNER_FILE).write_text(json.dumps(owner_doc, indent=1, allow_nan=False) + "\n")
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


def _as_step(entry: dict[str, Any] | PlanStep) -> PlanStep:
    return entry if isinstance(entry, PlanStep) else PlanStep.from_dict(entry)


def _load_owner_facts(path: Path, plan_hash: str) -> dict[str, Any] | None:
    """owner.json's facts if it exists and belongs to this plan, else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != OWNER_FORMAT or doc.get("plan_hash") != plan_hash:
        return None
    return {k: v for k, v in doc.items() if k not in ("format", "plan_hash")}
