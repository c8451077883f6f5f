"""The record of one evaluation, as the pipeline passes it on and metrics.json holds it (storage.metrics
writes and reads the file; tasks.evaluate makes the record). A light module: what reads records (the run
summary, the comparison, tools) need not import the evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from dumo_model.metrics import Scores
from dumo_model.samplers import SamplerConfig


@dataclass(frozen=True)
class ExtractorInfo:
    name: str  # a key of FEATURE_EXTRACTORS
    id: str | None  # inception: named after its weights' digest
    classifier_holdout_accuracy: float | None  # classifier: its accuracy on the held-out real images


@dataclass(frozen=True)
class ReferenceInfo:
    source: str  # "computed:<url>" or "npz:<path>"
    digest: str  # sha256 of that object
    real_images: dict[str, Any] | None  # the real images' identity and source (storage.reference_stats)


@dataclass(frozen=True)
class SamplerResult:
    """One sampler's part of the record; in metrics.json its scores sit beside the sampler settings."""

    sampler: SamplerConfig
    scores: Scores
    seconds: float
    samples_file: str
    samples_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"sampler": asdict(self.sampler), **asdict(self.scores), "seconds": self.seconds} | {
            "samples_file": self.samples_file,
            "samples_sha256": self.samples_sha256,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SamplerResult:
        return cls(SamplerConfig(**d["sampler"]), _scores(d), d["seconds"], d["samples_file"], d["samples_sha256"])


@dataclass(frozen=True)
class EvalRecord:
    """What one evaluation measured; written as metrics.json (storage.metrics), which other tools read."""

    schema_version: int
    evaluation_id: str
    run: str
    step: int
    checkpoint_url: str
    checkpoint_digest: str
    protocol: str
    protocol_hash: str
    protocol_config: dict[str, Any]  # the EvalConfig, as JSON
    eval_dir: str
    num_samples: int
    num_classes: int
    feature_extractor: ExtractorInfo
    reference: ReferenceInfo
    real: Scores | None  # held-out real images: what a perfect generator would score
    samplers: dict[str, SamplerResult]  # by sampler label, in protocol order
    files: dict[str, str]  # file name -> sha256
    device: str
    seconds: float
    created_at: str
    software: dict[str, str | None]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out |= {"feature_extractor": asdict(self.feature_extractor), "reference": asdict(self.reference)}
        out["real"] = None if self.real is None else asdict(self.real)
        out["samplers"] = {label: s.to_json() for label, s in self.samplers.items()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalRecord:
        values = {f.name: d[f.name] for f in fields(cls)}
        values["feature_extractor"] = ExtractorInfo(**d["feature_extractor"])
        values["reference"] = ReferenceInfo(**d["reference"])
        values["real"] = None if d["real"] is None else _scores(d["real"])
        values["samplers"] = {label: SamplerResult.from_json(s) for label, s in d["samplers"].items()}
        return cls(**values)


def _scores(d: dict[str, Any]) -> Scores:
    return Scores(**{f.name: d.get(f.name) for f in fields(Scores)})


# -- protocol -----------------------------------------------------------------------------------------
