"""The data pipeline's recipe: one dataclass per stage, every field overridable as
`section.key=value` (e.g. `near.threshold=0.7 quality.code.max_line_length=2000 engine.workers=4`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from lmforge.config import check_choice, check_fraction, check_non_negative, check_positive, require
from lmforge.data.decontam import DecontamConfig
from lmforge.data.dedup_exact import ExactDedupConfig
from lmforge.data.dedup_near import NearDupConfig
from lmforge.data.mixing import MixingConfig
from lmforge.data.normalize import NormalizeConfig
from lmforge.data.pii import TYPES as PII_TYPES
from lmforge.data.pii import PIIConfig
from lmforge.data.quality import QualityConfig
from lmforge.corpus.readers import ReaderConfig
from lmforge.data.toxicity import ToxicityConfig


@dataclass
class EngineConfig:
    engine: str = "local"  # local | ray
    workers: int = 0  # 0: every available CPU
    ray_address: str = ""  # empty: start a local Ray instance
    start_method: str = "auto"  # local engine: auto | fork | forkserver | spawn
    batch_docs: int = 1000  # a batch (one output part) holds at most this many documents ...
    batch_bytes: int = 2 * 2**20  # ... and about this many bytes of text
    zstd_level: int = 3

    def __post_init__(self):
        check_choice(self, "engine", "engine", ("local", "ray"))
        check_non_negative(self, "engine", "workers")
        check_choice(self, "engine", "start_method", ("auto", "fork", "forkserver", "spawn"))
        check_positive(self, "engine", "batch_docs", "batch_bytes")
        require(1 <= self.zstd_level <= 22, "engine.zstd_level", "in 1..22", self.zstd_level)


@dataclass
class TokenShardConfig:
    val_fraction: float = 0.05  # for documents without meta['split']
    shard_tokens: int = 50_000_000
    batch_docs: int = 256  # documents per encode_batch call

    def __post_init__(self):
        require(0 <= self.val_fraction < 1, "tokens.val_fraction", "a fraction in [0, 1)", self.val_fraction)
        check_positive(self, "tokens", "shard_tokens", "batch_docs")


@dataclass
class PipelineConfig:
    read: ReaderConfig = field(default_factory=ReaderConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near: NearDupConfig = field(default_factory=NearDupConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    tokens: TokenShardConfig = field(default_factory=TokenShardConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        """Range checks for the stage sections (their dataclasses live with the stages)."""
        check_choice(self.read, "read", "on_bad_utf8", ("skip", "replace"))
        check_positive(self.read, "read", "max_file_bytes")
        check_non_negative(self.normalize, "normalize", "max_blank_lines")
        near = self.near
        require(0 < near.threshold < 1, "near.threshold", "in (0, 1)", near.threshold)
        check_positive(near, "near", "shingle_size", "num_perm", "max_bucket")
        check_non_negative(near, "near", "bands", "rows", "fp_weight", "fn_weight", "seed")
        require(near.fp_weight + near.fn_weight > 0, "near.fp_weight + near.fn_weight", "> 0",
                near.fp_weight + near.fn_weight)
        require((near.bands == 0) == (near.rows == 0), "near.bands and near.rows", "both 0 (automatic) or both set",
                (near.bands, near.rows))
        require(near.bands * near.rows <= near.num_perm, "near.bands * near.rows", f"<= near.num_perm={near.num_perm}",
                near.bands * near.rows)
        check_choice(near, "near", "backend", ("numpy", "datasketch"))
        self._check_quality()
        for t in self.pii.types:
            require(t in PII_TYPES, "pii.types", f"a list of {', '.join(PII_TYPES)}", self.pii.types)
        check_non_negative(self.pii, "pii", "secret_min_entropy")
        check_fraction(self.toxicity, "toxicity", "threshold")
        check_positive(self.toxicity, "toxicity", "scale", "min_words", "batch_size", "max_length")
        check_positive(self.decontam, "decontam", "ngram", "min_overlaps")
        mix = self.mixing
        require(mix.domain in ("source", "cluster") or (mix.domain.startswith("meta:") and len(mix.domain) > 5),
                "mixing.domain", "source, cluster or meta:KEY", mix.domain)
        for domain, w in mix.weights.items():
            require(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
                    f"mixing.weights.{domain}", "a number >= 0", w)
        check_non_negative(mix, "mixing", "default_weight", "seed")
        check_positive(mix, "mixing", "clusters", "embed_dim")

    def _check_quality(self) -> None:
        for section, q in (("quality.text", self.quality.text), ("quality.code", self.quality.code)):
            for name, value in vars(q).items():
                where = f"{section}.{name}"
                if isinstance(value, bool):
                    continue
                if name.endswith(("_fraction", "_ratio")):
                    values = value.values() if isinstance(value, dict) else [value]
                    require(all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values), where,
                            "a fraction in [0, 1]", value)
                elif isinstance(value, (int, float)):
                    require(value >= 0, where, ">= 0", value)
        text = self.quality.text
        require(text.min_words <= text.max_words, "quality.text.min_words", f"<= max_words={text.max_words}",
                text.min_words)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the cleaned output (not the engine or worker count)."""
        d = asdict(self)
        d["engine"] = {k: v for k, v in d["engine"].items() if k in ("batch_docs", "batch_bytes", "zstd_level")}
        d.pop("mixing"), d.pop("tokens")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
