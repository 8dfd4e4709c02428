"""The typed results of one reproduction run: what the pipeline produces (`results.collect`) and
what table1.md, the figures, REPORT.md and the claims read, by attribute.

results.json is `Results.to_json()`, key for key and number for number what earlier versions
wrote; `Results.from_json` reads it back, including a file an older version wrote: a key that
file lacks takes the field's default (None or empty) and stays out of what `to_json` writes
again, and a key this version does not know is kept and written back as it was.

Every record the report reads is typed, down to the preset's settings (`PresetRecord`), the
decode timing (`DecodeTiming`), the paper-scale roofline (`PaperScaleRoofline`) and the claims'
verdicts (`Claim`). Only what it copies without reading stays plain JSON: the pretrain and
finetune stages' own results and the claims' numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

from gqa_t5.model.config import T5Config
from gqa_t5.reproduce.pipeline import presets


def _record_of(of):
  """A field holding `of` records: one, a list of them or a dict of them, as the JSON has it."""
  return {"of": of}


class _Record:
  """to_json / from_json for a dataclass of plain values and nested records (a field's
  metadata "of" names the record type of its items).

  Not dataclass fields, set by `from_json` only: the keys an older file lacked (left out
  again on writing) and the keys this version does not know (written back as they were).
  """
  _absent: Tuple[str, ...] = ()
  _unknown: Mapping[str, Any] = {}

  def to_json(self) -> Dict[str, Any]:
    out = dict(self._unknown)
    for field in dataclasses.fields(self):
      if field.name in self._absent:
        continue
      out[field.name] = _encode(getattr(self, field.name))
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any]):
    if not isinstance(data, Mapping):
      raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = dataclasses.fields(cls)
    values, absent = {}, []
    for field in known:
      if field.name in data:
        values[field.name] = _decode(data[field.name], field.metadata.get("of"))
      elif (field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING):
        absent.append(field.name)  # an older results.json: the default, not written back
      else:
        raise ValueError(f"results.json: {cls.__name__} has no {field.name!r} (it has "
                         f"{sorted(data)})")
    names = {f.name for f in known}
    record = cls(**values)
    record._absent = tuple(absent)
    record._unknown = {k: v for k, v in data.items() if k not in names}
    return record


def _encode(value: Any) -> Any:
  if isinstance(value, _Record):
    return value.to_json()
  if isinstance(value, list):
    return [_encode(item) for item in value]
  if isinstance(value, dict):
    return {key: _encode(item) for key, item in value.items()}
  return value


def _decode(value: Any, of) -> Any:
  if of is None or value is None:
    return value
  if isinstance(value, list):
    return [_decode(item, of) for item in value]
  if isinstance(value, dict) and not _looks_like(value, of):
    return {key: _decode(item, of) for key, item in value.items()}
  return of.from_json(value)


def _looks_like(value: Mapping[str, Any], of) -> bool:
  """Whether a JSON object is one `of` record (rather than a dict of them)."""
  return any(field.name in value for field in dataclasses.fields(of))


@dataclasses.dataclass
class VariantResult(_Record):
  """One fine-tuned variant: its scores, losses and time per sample."""
  key: str
  label: str
  short_label: str
  attention: str
  kv_heads: int
  method: str
  alpha: float
  seed: int
  uptrain_steps: int
  finetune: Dict[str, Any]                 # the finetune stage's result
  scores: Dict[str, Dict[str, float]]      # {task: {metric: value}}, with the loss
  main_scores: Dict[str, float]            # {task: the paper's metric}
  average: float                           # the mean of main_scores (the paper's 'Average')
  loss: Optional[float] = None             # the mean over tasks of the teacher-forced loss
  start_loss: Optional[float] = None       # pretraining-objective loss of its start checkpoint
  time_per_sample: float = 0.0
  time_per_step: float = 0.0


@dataclasses.dataclass
class MethodResult(_Record):
  """Fig. 4: MQA converted by one method, at the preset's method alpha."""
  method: str
  main_scores: Dict[str, float]
  average: float
  loss: Optional[float] = None
  start_loss: Optional[float] = None


@dataclasses.dataclass
class AlphaPoint(_Record):
  """Fig. 5: one uptraining proportion of one attention kind."""
  alpha: float
  average: float
  loss: Optional[float] = None
  start_loss: Optional[float] = None


@dataclasses.dataclass
class ConversionResult(_Record):
  """A converted checkpoint's pretraining-objective loss before any uptraining."""
  kv_heads: int
  method: str
  start_loss: float


@dataclasses.dataclass
class NoisePair(_Record):
  """One variant's average at seed 0 and at another seed."""
  label: str
  seed0: float
  other: float
  change: float


@dataclasses.dataclass
class NoiseDifference(_Record):
  """GQA's lead over MQA at seed 0 and at another seed."""
  seed: int
  gqa_minus_mqa_seed0: float
  gqa_minus_mqa: float


@dataclasses.dataclass
class Noise(_Record):
  """Seed-to-seed changes of the repeated comparison (None: no noise seeds at this preset)."""
  average: Optional[float] = None
  pairs: List[NoisePair] = dataclasses.field(default_factory=list,
                                             metadata=_record_of(NoisePair))
  differences: List[NoiseDifference] = dataclasses.field(default_factory=list,
                                                         metadata=_record_of(NoiseDifference))
  loss: Optional[float] = None

  def of(self, measure: str) -> Optional[float]:
    """The noise of a measure ('average' or 'loss'); None when not measured."""
    return {"average": self.average, "loss": self.loss}.get(measure)


@dataclasses.dataclass
class Scale(_Record):
  """The run's model and data, as Table 1's caption states them."""
  description: str
  num_heads: int
  num_layers: int
  emb_dim: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  params: int
  pretrain_steps: int
  pretrain_origin: str
  eval_examples: int
  data_fingerprint: str = ""
  dtype: Optional[str] = None


@dataclasses.dataclass
class Throughput(_Record):
  """Pretraining tokens/s and, on a GPU, its MFU against the machine table's peak."""
  tokens_per_second: Optional[float]
  compile_excluded: bool
  flops_per_token: float
  peak_flops: float
  peak_name: str
  mfu: Optional[float] = None


@dataclasses.dataclass
class PaperTimingRow(_Record):
  """One paper-shape model: measured s/sample, the roofline here and on TPU v4, the paper's."""
  measured: float
  roofline_here: Optional[float]
  roofline_tpu: Optional[float]
  paper: Optional[float]
  size: str
  kv_heads: int


@dataclasses.dataclass
class PaperTimingTable(_Record):
  """Decode timing at the paper's shapes, by Table 1 row name."""
  rows: Dict[str, PaperTimingRow] = dataclasses.field(default_factory=dict,
                                                       metadata=_record_of(PaperTimingRow))
  batch: int = 0
  dtype: str = ""
  input_length: int = 0
  output_length: int = 0
  bandwidth_bytes_per_s: float = 0.0


@dataclasses.dataclass
class PresetRecord(_Record):
  """The preset a run used (`ReproducePreset.to_dict()`): the settings the report and the claims
  read; the preset's other fields are kept as they are and written back."""
  name: str
  gqa_kv_heads: int
  alphas: List[float]
  method_alpha: float
  noise_seeds: List[int]
  pretrain_steps: int
  pretrain_warmup_steps: int
  pretrain_learning_rate: float
  finetune_steps: int
  finetune_learning_rate: Optional[float] = None
  finetune_lr: Optional[float] = None      # derived; older files lack it
  time_figure: Optional[str] = None        # older files lack it

  def finetune_rate(self) -> float:
    """The constant fine-tuning rate (an older file lacks it: derived as the preset derives it)."""
    if self.finetune_lr is not None:
      return self.finetune_lr
    return presets.finetune_rate(self.finetune_learning_rate, self.pretrain_learning_rate,
                                 self.pretrain_steps, self.pretrain_warmup_steps)


@dataclasses.dataclass
class StepBytes(_Record):
  """The bytes one decode step reads (`perf_model.decode_step_bytes`)."""
  weights: int
  cross_kv: int
  self_cache: int
  total: int

  def cache_share(self) -> float:
    """The key/value caches' share of the step's bytes."""
    return (self.cross_kv + self.self_cache) / self.total


@dataclasses.dataclass
class KvTiming(_Record):
  """One K's decode timing of the preset's model (seconds)."""
  time_per_sample: float
  time_per_step: float
  kv_heads: Optional[int] = None
  decode_time_per_sample: Optional[float] = None
  encode_time_per_sample: Optional[float] = None
  time_per_step_median: Optional[float] = None
  bytes_per_step: Optional[StepBytes] = dataclasses.field(default=None,
                                                          metadata=_record_of(StepBytes))
  roofline_fraction: Optional[float] = None  # of the measured memory roofline


@dataclasses.dataclass
class TimingShape(_Record):
  """The timed batch and lengths, and the timed model's sizes (an older file lacks them)."""
  batch: int
  input_length: int
  output_length: int
  emb_dim: Optional[int] = None
  num_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: Optional[int] = None
  layers: Optional[int] = None             # per stack
  vocab_size: Optional[int] = None
  dtype: Optional[str] = None

  def config(self, kv_heads: Optional[int] = None) -> T5Config:
    """The timed model with `kv_heads` key/value heads (None: multi-head)."""
    sizes = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "layers", "vocab_size", "dtype")
    missing = [name for name in sizes if getattr(self, name) is None]
    if missing:
      raise ValueError(f"results.json: the timing shape has no {', '.join(missing)} (a file "
                       f"an older version wrote): the timed model is not known")
    return T5Config(vocab_size=self.vocab_size, emb_dim=self.emb_dim, num_heads=self.num_heads,
                    head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                    num_encoder_layers=self.layers, num_decoder_layers=self.layers,
                    num_kv_heads=kv_heads, dtype=self.dtype)


@dataclasses.dataclass
class DecodeTiming(_Record):
  """The timing stage's result: every K of the preset's model at one shape."""
  kv_heads: Dict[str, KvTiming] = dataclasses.field(metadata=_record_of(KvTiming))
  shape: TimingShape = dataclasses.field(metadata=_record_of(TimingShape))
  dtype: Optional[str] = None
  bandwidth_bytes_per_s: Optional[float] = None

  def ks(self) -> List[int]:
    """The K timed, smallest first."""
    return sorted(int(k) for k in self.kv_heads)

  def of(self, kv_heads: int) -> KvTiming:
    return self.kv_heads[str(kv_heads)]


@dataclasses.dataclass
class PaperScaleRoofline(_Record):
  """The roofline model's seconds per sample at paper scale (T5.1.1 on TPU v4, `timing_sim`):
  XXL by number of key/value groups, and Table 1's rows by name."""
  groups_xxl: Dict[str, float]
  table1: Dict[str, float]

  def xxl(self, kv_heads: int) -> float:
    return self.groups_xxl[str(kv_heads)]

  def xxl_groups(self) -> List[int]:
    """The K of the XXL curve, smallest first (the last is MHA)."""
    return sorted(int(k) for k in self.groups_xxl)


@dataclasses.dataclass
class CrossCheck(_Record):
  """A claim judged again on another measure than the paper's."""
  verdict: str
  tolerance: Optional[str] = None
  evidence: Optional[str] = None


@dataclasses.dataclass
class Claim(_Record):
  """One claim's verdict on the paper's measure, its evidence and tolerance, and its verdicts on
  the cross-check measures (`checks`, by measure: in results.json flat, as `loss_verdict`,
  `loss_tolerance`, `loss_evidence`, ...)."""
  id: str
  verdict: str
  evidence: str
  statement: Optional[str] = None
  tolerance: Optional[str] = None
  numbers: Optional[Dict[str, Any]] = None   # absent when the claim was not run
  checks: Dict[str, CrossCheck] = dataclasses.field(default_factory=dict)

  _FLAT = ("verdict", "tolerance", "evidence")

  def to_json(self) -> Dict[str, Any]:
    out = dict(self._unknown)
    out.update(id=self.id, verdict=self.verdict, evidence=self.evidence)
    for name in ("statement", "tolerance", "numbers"):
      if getattr(self, name) is not None:
        out[name] = getattr(self, name)
    for measure, check in self.checks.items():
      for part in self._FLAT:
        if getattr(check, part) is not None:
          out[f"{measure}_{part}"] = getattr(check, part)
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Claim":
    if not isinstance(data, Mapping):
      raise ValueError(f"Claim: expected a JSON object, got {type(data).__name__}")
    for key in ("id", "verdict", "evidence"):
      if key not in data:
        raise ValueError(f"results.json: Claim has no {key!r} (it has {sorted(data)})")
    measures = [key[:-len("_verdict")] for key in data if key.endswith("_verdict")]
    flat = {f"{m}_{part}" for m in measures for part in cls._FLAT}
    claim = cls(id=data["id"], verdict=data["verdict"], evidence=data["evidence"],
                statement=data.get("statement"), tolerance=data.get("tolerance"),
                numbers=data.get("numbers"),
                checks={m: CrossCheck(**{part: data.get(f"{m}_{part}") for part in cls._FLAT})
                        for m in measures})
    own = {"id", "verdict", "evidence", "statement", "tolerance", "numbers"}
    claim._unknown = {k: v for k, v in data.items() if k not in own and k not in flat}
    return claim


@dataclasses.dataclass
class StageTime(_Record):
  """One stage's seconds in this invocation, and whether its cached result was reused."""
  seconds: float
  cached: bool


@dataclasses.dataclass
class MachineRecord(_Record):
  """What the run ran on."""
  description: str
  cpu_count: Optional[int] = None


@dataclasses.dataclass
class Results(_Record):
  """Everything a run measured and what the outputs show (results.json)."""
  preset: PresetRecord = dataclasses.field(metadata=_record_of(PresetRecord))
  scale: Scale = dataclasses.field(metadata=_record_of(Scale))
  pretrain: Dict[str, Any]                 # the pretrain stage's result
  variants: List[VariantResult] = dataclasses.field(metadata=_record_of(VariantResult))
  headline: List[VariantResult] = dataclasses.field(metadata=_record_of(VariantResult))
  methods: List[MethodResult] = dataclasses.field(metadata=_record_of(MethodResult))
  mha: Optional[VariantResult] = dataclasses.field(metadata=_record_of(VariantResult))
  alpha_curves: Dict[str, List[AlphaPoint]] = dataclasses.field(
      metadata=_record_of(AlphaPoint))
  timing: DecodeTiming = dataclasses.field(metadata=_record_of(DecodeTiming))
  noise: Noise = dataclasses.field(metadata=_record_of(Noise))
  stages: Dict[str, StageTime] = dataclasses.field(metadata=_record_of(StageTime))
  wall_seconds: float
  stage_seconds: float
  machine: MachineRecord = dataclasses.field(metadata=_record_of(MachineRecord))
  conversions: List[ConversionResult] = dataclasses.field(
      default_factory=list, metadata=_record_of(ConversionResult))
  paper_scale_roofline: Optional[PaperScaleRoofline] = dataclasses.field(
      default=None, metadata=_record_of(PaperScaleRoofline))
  pretrain_throughput: Optional[Throughput] = dataclasses.field(
      default=None, metadata=_record_of(Throughput))
  paper_timing: Optional[PaperTimingTable] = dataclasses.field(
      default=None, metadata=_record_of(PaperTimingTable))
  claims: List[Claim] = dataclasses.field(default_factory=list, metadata=_record_of(Claim))

  def find(self, kv_heads: int, method: str = "mean", alpha: float = 0.0,
           seed: int = 0) -> Optional[VariantResult]:
    """The variant with K = kv_heads (any method and alpha when K = N), or None."""
    for v in self.variants:
      if (v.kv_heads, v.seed) != (kv_heads, seed):
        continue
      if kv_heads == self.scale.num_heads or (v.method == method
                                               and abs(v.alpha - alpha) < 1e-9):
        return v
    return None
