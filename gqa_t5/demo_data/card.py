"""The data card of a prepared demo directory (DATA_CARD.md and data_card.json)."""

from __future__ import annotations

from typing import Mapping

from gqa_t5.demo_data import sources

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
