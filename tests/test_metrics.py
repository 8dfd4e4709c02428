"""Metric functions against values worked out by hand on small strings."""

import math

import pytest

pytest.importorskip("seqio")  # the data extra; absent on a TensorFlow-free GPU box
pytest.importorskip("rouge_score")  # the data extra; absent on a TensorFlow-free GPU box
pytest.importorskip("sacrebleu")  # the data extra; absent on a TensorFlow-free GPU box
from gqa_t5.tasks import metrics


def test_rouge_single_example_by_hand():
  # target: the cat sat on the mat (6 words, 5 bigrams); prediction: the cat sat.
  # rouge1: 3 matches, P = 3/3, R = 3/6 -> F = 2/3. rouge2: 2 matches, P = 1, R = 2/5
  # -> F = 4/7. rougeL: LCS = 3 -> 2/3, and rougeLsum the same for one sentence.
  scores = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
  assert scores["rouge1"] == pytest.approx(200 / 3)
  assert scores["rouge2"] == pytest.approx(400 / 7)
  assert scores["rougeL"] == pytest.approx(200 / 3)
  assert scores["rougeLsum"] == pytest.approx(200 / 3)


def test_rouge_is_the_mean_over_examples():
  scores = metrics.rouge(["the cat sat on the mat", "a b"], ["the cat sat", "a b"])
  assert scores["rouge1"] == pytest.approx((200 / 3 + 100) / 2)


def test_rouge_lsum_scores_sentences_separately():
  # Swapped sentences: the LCS over the whole text is 3 of 6 words (F = 1/2), but each
  # reference sentence is matched in full by one predicted sentence (F = 1).
  scores = metrics.rouge(["A b c. D e f."], ["D e f. A b c."])
  assert scores["rougeL"] == pytest.approx(50.0)
  assert scores["rougeLsum"] == pytest.approx(100.0)


def test_rouge_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.rouge(["a", "b"], ["a"])


def test_bleu_by_hand():
  # hypothesis: the cat sat on the mat; reference: the cat sat on a mat.
  # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty:
  # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4).
  score = metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])["bleu"]
  assert score == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-3)


def test_bleu_brevity_penalty_by_hand():
  # Every n-gram of the 4-word hypothesis is in the 6-word reference: precisions 1, and
  # the brevity penalty is exp(1 - 6/4).
  score = metrics.bleu(["the cat sat on the mat"], ["the cat sat on"])["bleu"]
  assert score == pytest.approx(100 * math.exp(-0.5), abs=1e-3)


def test_bleu_multiple_references_take_the_best_match():
  score = metrics.bleu([["a dog ran far away", "the cat sat on the mat"]],
                       ["the cat sat on the mat"])["bleu"]
  assert score == pytest.approx(100.0)


def test_squad_exact_match_and_f1_by_hand():
  # 1: "The Cat!" normalises to "cat" = the answer "a cat": EM 1, F1 1.
  # 2: "black cat sat" vs "the cat" -> [black, cat, sat] vs [cat]: P = 1/3, R = 1,
  #    F1 = 1/2; the other answer "dog" scores 0, the maximum is taken.
  # 3: nothing in common: 0, 0.
  scores = metrics.squad([["a cat"], ["dog", "the cat"], ["red"]],
                         ["The Cat!", "black cat sat", "blue"])
  assert scores["em"] == pytest.approx(100 / 3)
  assert scores["f1"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_trivia_qa_normalisation_differs_from_squad():
  # TriviaQA turns punctuation and "_" into spaces; SQuAD deletes punctuation.
  assert metrics.normalize_trivia_qa("Jean-Paul  Sartre_") == "jean paul sartre"
  assert metrics.normalize_squad("Jean-Paul  Sartre") == "jeanpaul sartre"
  assert metrics.normalize_trivia_qa("‘The’ Beatles") == "beatles"
  assert metrics.trivia_qa([["Jean-Paul"]], ["jean paul"]) == {"em": 100.0, "f1": 100.0}
  assert metrics.squad([["Jean-Paul"]], ["jean paul"]) == {"em": 0.0, "f1": 0.0}


def test_qa_accepts_a_single_answer_string_and_rejects_no_answer():
  assert metrics.squad(["Paris"], ["paris."])["em"] == 100.0
  with pytest.raises(ValueError, match="no reference answer"):
    metrics.squad([[]], ["x"])


def test_split_sentences():
  assert metrics.split_sentences("One. Two!  Three?\nFour") == "One.\nTwo!\nThree?\nFour"
