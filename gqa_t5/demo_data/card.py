"""The data card of a prepared demo directory (DATA_CARD.md and data_card.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from gqa_t5.demo_data import extract
from gqa_t5.demo_data import layout
from gqa_t5.demo_data import sources
from gqa_t5.demo_data import splits

TASKS = {
    "pretrain": ("demo_span_corruption",
                 "T5 span corruption over Wikipedia lead paragraphs (summarization train "
                 "split only) and the reading-comprehension passages of BIG-bench's "
                 "Natural Instructions (DROP, Quoref, CosmosQA, MultiRC, ROPES)"),
    "summarize": ("demo_summarize",
                  "Wikipedia lead paragraph -> the article's short description"),
    "translate_en_de": ("demo_translate_en_de",
                        "World English Bible verse -> the same verse in the Elberfelder"),
    "qa": ("demo_qa", "SQuAD-shifts (Wikipedia, New York Times, Reddit, Amazon reviews, "
           "SQuAD v1.1 dev): question + context -> answer span"),
}

# How the demo tasks format their inputs (kept equal to gqa_t5.tasks.preprocessors'
# prefixes by a test); used here only to report token lengths.
INPUT_FORMATS = {
    "summarize": lambda r: "summarize: " + r["document"],
    "translate_en_de": lambda r: "translate English to German: " + r["en"],
    "qa": lambda r: f"question: {r['question']} context: {r['context']}",
}
TARGET_FORMATS = {
    "summarize": lambda r: r["summary"],
    "translate_en_de": lambda r: r["de"],
    "qa": lambda r: r["answers"][0],
}
TASK_OF = {"summarize": "demo_summarize", "translate_en_de": "demo_translate_en_de",
           "qa": "demo_qa"}


def card_markdown(card: Mapping) -> str:
  """A human-readable rendering of the card dictionary built by `prepare`."""
  lines = ["# gqa_t5 demo data card", "",
           "Real, human-written text for running the whole pipeline offline. Built by "
           "`gqa-t5 prepare-demo-data` from three pinned archives of the Python package "
           "index; see docs/DATA.md.", "", "## Sources", "",
           "| key | package | sha256 | licence | what is read |", "|---|---|---|---|---|"]
  for spec in sources.ARCHIVES:
    lines.append(f"| {spec.key} | `{spec.requirement}` ({spec.filename}) | "
                 f"`{card['inputs'][spec.key]['sha256']}` | {spec.licence} | "
                 f"{spec.description} |")
  lines += ["", "## Tasks and counts", "",
            "| data set | seqio task | content | " + " | ".join(("train", "validation",
                                                              "test")) + " |",
            "|---|---|---|---|---|---|"]
  for dataset, (task, content) in TASKS.items():
    counts = card["counts"][dataset]
    cells = " | ".join(str(counts.get(s, "-")) for s in ("train", "validation", "test"))
    lines.append(f"| {dataset} | `{task}` | {content} | {cells} |")
  lines += ["", "## Processing", ""]
  lines += [f"- {step}" for step in card["processing"]]
  lines += ["", "## Token lengths (demo vocabulary, with EOS)", "",
            "| data set | feature | default length | mean | max | share over the length |",
            "|---|---|---|---|---|---|"]
  for dataset, features in card["token_lengths"].items():
    for feature, stats in features.items():
      lines.append(f"| {dataset} | {feature} | {stats['default_length']} | "
                   f"{stats['mean']:.1f} | {stats['max']} | "
                   f"{100 * stats['share_over']:.1f}% |")
  lines += ["", "## Output files (sha256)", ""]
  lines += [f"- `{name}`: `{entry['sha256']}` ({entry['size']} bytes)"
            for name, entry in sorted(card["outputs"].items())]
  lines += ["", "## Caveats", ""]
  lines += [f"- {caveat}" for caveat in card["caveats"]]
  return "\n".join(lines) + "\n"


def card_dict(specs: Sequence[sources.ArchiveSpec], datasets: Mapping[str, Mapping[str, list]],
              vocab_size: int, dropped: int, token_lengths: Mapping) -> dict:
  """The card dictionary of a prepared directory (the caller adds `outputs`)."""
  counts = {d: {s: len(r) for s, r in by_split.items()} for d, by_split in datasets.items()}
  return {
      "format_version": layout.FORMAT_VERSION,
      "inputs": {spec.key: {"requirement": spec.requirement, "filename": spec.filename,
                            "sha256": spec.sha256, "licence": spec.licence,
                            "content": spec.description}
                 for spec in specs},
      "counts": counts,
      "vocabulary": {"path": layout.VOCAB_MODEL, "pieces": vocab_size,
                     "extra_ids": 100, "model_type": "unigram",
                     "trained_on": "pretrain/train text + translate_en_de/train (both "
                                   "sides)"},
      "token_lengths": token_lengths,
      "processing": [
          "whitespace collapsed to single spaces; World English Bible backticks -> "
          "apostrophes; Natural Instructions passages lightly detokenized "
          "(' ,' -> ',', \"do n't\" -> \"don't\"), MultiRC sentence numbers removed, "
          f"passages under {extract.MIN_PASSAGE_WORDS} words dropped, duplicates dropped",
          "splits fixed by a sha256 of the group key: Wikipedia title, Bible chapter, "
          f"QA context; validation {splits.EVAL_FRACTIONS['validation']:.0%}, test "
          f"{splits.EVAL_FRACTIONS['test']:.0%}; pretraining validation "
          f"{splits.PRETRAIN_VALIDATION_FRACTION:.0%}",
          "pretraining text = Wikipedia leads of the summarization train split + "
          "Natural Instructions passages, minus every text sharing a "
          f"{splits.OVERLAP_NGRAM}-word sequence with a validation/test document "
          f"of any task ({dropped} dropped)",
      ],
      "caveats": [
          "Summaries are Wikipedia's short descriptions (a few words), not abstracts: "
          "ROUGE on them is a smoke test of the pipeline, not a benchmark.",
          "The German side is the Elberfelder in pre-1996 orthography, a literal "
          "translation; BLEU against it is low even for good translations.",
          "BIG-bench files carry a canary string asking that benchmark data not appear "
          "in training corpora. Train on this demo data only to try the code; do not "
          "publish such models or evaluate them on BIG-bench.",
      ],
  }


def token_length_stats(model_path: Path, datasets: Mapping[str, Mapping[str, list]]
                        ) -> dict:
  """Token counts (with EOS) of every demo example against the default lengths."""
  import sentencepiece as spm  # optional extra (the data extra): only preparation needs it
  processor = spm.SentencePieceProcessor(model_file=str(model_path))
  stats = {}
  for feature, formats in (("inputs", INPUT_FORMATS), ("targets", TARGET_FORMATS)):
    for name, to_text in formats.items():
      records = [r for split in datasets[name].values() for r in split]
      counts = [len(ids) + 1 for ids in processor.encode([to_text(r) for r in records])]
      limit = layout.DEMO_FEATURE_LENGTHS[TASK_OF[name]][feature]
      stats.setdefault(name, {})[feature] = {
          "default_length": limit, "mean": sum(counts) / len(counts), "max": max(counts),
          "share_over": sum(c > limit for c in counts) / len(counts)}
  return stats
