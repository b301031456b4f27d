"""The data pipeline's recipe: one dataclass per stage, every field overridable as
`section.key=value` (e.g. `near.threshold=0.7 quality.code.max_line_length=2000 engine.workers=4`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from lmforge.data.decontam import DecontamConfig
from lmforge.data.dedup_exact import ExactDedupConfig
from lmforge.data.dedup_near import NearDupConfig
from lmforge.data.mixing import MixingConfig
from lmforge.data.normalize import NormalizeConfig
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


@dataclass
class TokenShardConfig:
    val_fraction: float = 0.05  # for documents without meta['split']
    shard_tokens: int = 50_000_000
    batch_docs: int = 256  # documents per encode_batch call


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

    def fingerprint(self) -> str:
        """Hash of every setting that changes the cleaned output (not the engine or worker count)."""
        d = asdict(self)
        d["engine"] = {k: v for k, v in d["engine"].items() if k in ("batch_docs", "batch_bytes", "zstd_level")}
        d.pop("mixing"), d.pop("tokens")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
