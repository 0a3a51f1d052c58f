"""The "ifeval" reward: every IFEval instruction passes and fails on hand-written responses, loose vs
strict, thinking ignored, fractional rewards, and malformed rows reported as errors."""

from __future__ import annotations

import pytest

from nemo_prorl.config.schema import IFEvalRewardConfig, RewardConfig
from nemo_prorl.rewards import RewardInput, RewardSuite, safe_score
from nemo_prorl.rewards import ifeval, ifeval_text
from nemo_prorl.rewards.base import REWARDS


# IFEval's own semantics, as `prorl eval` scores them: these tests pin each instruction on short hand-written
# responses, which training's attempt gate (tests/test_redteam_answers.py) would score 0 before any check.
UPSTREAM_CONFIG = RewardConfig(ifeval=IFEvalRewardConfig(require_attempt=False))
UPSTREAM = RewardSuite(UPSTREAM_CONFIG)


def score(response: str, ids: list[str], kwargs=None, **meta):
    """Score through the registry, as the trainer does (never raises)."""
    metadata = {"instruction_id_list": ids, **meta}
    if kwargs is not None:
        metadata["kwargs"] = kwargs
    return UPSTREAM.score("ifeval", RewardInput(response=response, ground_truth="", metadata=metadata))


# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "Banana"]},
     "I ate an APPLE and a banana.", "I ate an apple."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "A cat met another Cat.", "A cat met a dog."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     "A cat met a dog.", "A cat met another Cat."),
    ("keywords:forbidden_words", {"forbidden_words": ["red", "blue"]},
     "The sky looks reddish today.", "The sky is Blue today."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
     "Zoo time.", "Zoo buzz."),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 3, "let_relation": "at least"},
     "Zoo buzz.", "Zoo time."),
    ("language:response_language", {"language": "fr"},
     "Le chat est assis sur le tapis et regarde la pluie tomber doucement.",
     "The cat is sitting on the carpet and watching the rain fall gently."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith paid $3.50 for it. He left!!", "One. Two! Three? Four."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "One. Two! Three?", "Mr. Brown met Mrs. Green. They talked."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", "First.\n***\n***\nSecond."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "***\nA\n***\nB\n***\nC\n***", "A\n***\nB"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two three, four!"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "one two three, four!", "one two three four five"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     'Intro text.\n\n"However, yes." it said.', "Intro text.\n\nBut no."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "intro"},
     "Intro text.\n\nMore.", "Intro text.\n\nMore.\n\nEven more."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], I live at [address].", "Dear [name], I live nearby."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Hello there.\np. s. see you soon", "Hello there. PS see you soon"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Hello.\nP.P.S. one more thing", "Hello.\nP.S. one more thing"),
    ("detectable_content:postscript", {"postscript_marker": "Note:"},
     "Hello.\nNOTE: bring snacks", "Hello. Bring snacks."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Items:\n* apples\n  - pears", "Items:\n* apples\n- pears\n* plums"),
    ("detectable_format:constrained_response", {},
     "Let me think. My answer is maybe.", "Yes, it is."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "This is *one* and **two**.", "This is *one* and ** **."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nintro\nSECTION 2\nbody", "SECTION 1\nintro\nSection 2\nbody"),
    ("detectable_format:json_format", {},
     '```json\n{"a": [1, 2]}\n```', 'Here it is: {"a": 1}'),
    ("detectable_format:title", {},
     "<<Poem of Joy>>\nRoses are red.", "<< >>\nRoses are red."),
    ("combination:two_responses", {},
     "Answer one.\n******\nAnswer two.", "Same answer.\n******\nSame answer."),
    ("combination:two_responses", {},
     "******\nAnswer one.\n******\nAnswer two.", "Answer one.\n******\n******\nAnswer two."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "write a poem about cats. Cats sleep all day.", "Sure! Write a poem about cats."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     'That is all. any other questions?"', "Any other questions? That is all."),
    ("startend:quotation", {},
     '  "The whole reply is quoted."\n', 'The reply is "partly" quoted.'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY-GOOD news", "This is Good news, OK"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "This is Good news, OK", "THIS is VERY GOOD news"),
    ("change_case:english_capital", {},
     "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
     "This is an English sentence about the weather today."),
    ("change_case:english_lowercase", {},
     "this is an english sentence about the weather today.",
     "this is an English sentence about the weather today."),
    ("change_case:english_lowercase", {},
     "the weather is lovely today and i will go for a long walk in the park.",
     "le chat est assis sur le tapis et regarde la pluie tomber doucement."),
    ("punctuation:no_comma", {},
     "No commas in here at all.", "Yes, there is one."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_instruction_passes_and_fails(iid, kwargs, good, bad):
    ok = score(good, [iid], [kwargs])
    assert ok.status == "ok", ok.reason
    assert (ok.reward, ok.correct, ok.info["strict"]) == (1.0, True, 1.0)
    no = score(bad, [iid], [kwargs])
    assert no.status == "ok", no.reason
    assert (no.reward, no.correct, no.info["strict"], no.info["strict_all"]) == (0.0, False, 0.0, 0.0)
    assert iid in no.reason


def test_every_registered_instruction_is_covered():
    assert {c[0] for c in CASES} == set(ifeval.INSTRUCTIONS)
    assert len(ifeval.INSTRUCTIONS) == 25


@pytest.mark.parametrize("iid,kwargs,response", [
    # a preamble line breaks the rule; the rest follows it
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas in this answer."),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name a fruit."}, "Okay!\nName a fruit. Apple."),
    # markdown emphasis around the final phrase
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done.\n**Any other questions?**"),
    ("startend:quotation", {}, '"Quoted answer."\nHope this helps!'),
])
def test_loose_accepts_what_strict_rejects(iid, kwargs, response):
    res = score(response, [iid], [kwargs])
    assert res.status == "ok", res.reason
    assert res.reward == 0.0 and res.correct is False
    assert res.info == {"strict": 0.0, "loose": 1.0, "strict_all": 0.0, "loose_all": 1.0}


def test_loose_variants_are_ifeval_s_eight():
    variants = ifeval.loose_variants("first *\nmid*dle\nlast")
    assert set(variants) == {
        "first *\nmid*dle\nlast", "mid*dle\nlast", "first *\nmid*dle", "mid*dle",
        "first \nmiddle\nlast", "middle\nlast", "first \nmiddle", "middle",
    }


def test_only_text_after_thinking_is_checked():
    ids = ["punctuation:no_comma", "keywords:existence"]
    kwargs = [{}, {"keywords": ["zebra"]}]
    res = score("<think>Commas, commas, and a zebra.</think>\nNo commas and no stripes here.", ids, kwargs)
    assert res.status == "ok"
    assert res.reward == 0.5 and res.info["strict"] == 0.5
    assert "keywords:existence" in res.reason and "punctuation:no_comma" not in res.reason


def test_reward_is_the_fraction_followed():
    ids = ["punctuation:no_comma", "keywords:existence", "length_constraints:number_words",
           "detectable_format:title"]
    kwargs = [{}, {"keywords": ["moon"]}, {"num_words": 3, "relation": "less than"}, {}]
    res = score("<<Night>>\nThe moon rises over the quiet hills.", ids, kwargs)
    assert res.status == "ok"
    assert res.reward == pytest.approx(0.75) and res.correct is False
    # loosely, each instruction may pick its own variant: without the last line only "Night" is left
    assert res.info == {"strict": 0.75, "loose": 1.0, "strict_all": 0.0, "loose_all": 1.0}
    assert res.reason == "not followed: length_constraints:number_words"
    two_lines = score("<<Night>>\nThe moon rises.\nOver the quiet hills.", ids, kwargs)
    assert two_lines.info == {"strict": 0.75, "loose": 0.75, "strict_all": 0.0, "loose_all": 0.0}


def test_all_followed_is_correct():
    ids = ["punctuation:no_comma", "keywords:existence"]
    res = score("The moon is bright.", ids, [{}, {"keywords": ["moon"]}])
    assert res.status == "ok" and res.reward == 1.0 and res.correct is True and res.reason == ""
    assert res.info == {"strict": 1.0, "loose": 1.0, "strict_all": 1.0, "loose_all": 1.0}


def test_empty_answer_follows_nothing():
    # no_comma would trivially hold on empty text; IFEval requires a non-empty response
    res = score("<think>long thoughts, never finished</think>   ", ["punctuation:no_comma"], [{}])
    assert res.status == "ok" and res.reward == 0.0 and res.info["loose"] == 0.0


def test_none_kwargs_are_tolerated():
    # the Google data set pads every kwargs dict with all argument names set to None
    padded = {k: None for k in ("keywords", "num_words", "relation", "language", "end_phrase", "letter")}
    kwargs = [None, {**padded, "keywords": ["moon"]}, {**padded, "num_words": 2, "relation": "at least"}]
    ids = ["punctuation:no_comma", "keywords:existence", "length_constraints:number_words"]
    res = score("The moon is bright.", ids, kwargs)
    assert res.status == "ok", res.reason
    assert res.reward == 1.0 and res.correct is True


def test_kwargs_may_be_absent_or_a_json_string():
    assert score("No commas.", ["punctuation:no_comma"]).reward == 1.0
    res = score("The moon.", ["keywords:existence"], '[{"keywords": ["moon"], "num_words": null}]')
    assert res.status == "ok" and res.reward == 1.0


@pytest.mark.parametrize("ids,kwargs,needle", [
    (["keywords:no_such_thing"], [{}], "keywords:no_such_thing"),
    (["punctuation:no_comma", "made:up"], [{}, {}], "made:up"),
    (["keywords:existence"], [{"keywords": ["a"], "num_words": 3}], "num_words"),
    (["keywords:existence"], [{}], "keywords"),
    (["length_constraints:number_words"], [{"num_words": 5}], "relation"),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "at most"}], "relation"),
    (["length_constraints:number_words"], [{"num_words": "many", "relation": "at least"}], "num_words"),
    (["length_constraints:number_words"], [{"num_words": -1, "relation": "at least"}], "num_words"),
    (["keywords:letter_frequency"], [{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}], "letter"),
    (["combination:repeat_prompt"], [{"prompt_to_repeat": ""}], "prompt_to_repeat"),
    (["punctuation:no_comma"], ["not a dict"], "punctuation:no_comma"),
    (["punctuation:no_comma", "detectable_format:title"], [{}], "kwargs"),
    ([], [], "empty"),
])
def test_malformed_instructions_are_errors(ids, kwargs, needle):
    res = score("Some answer.", ids, kwargs)
    assert res.status == "error" and res.reward == 0.0 and res.correct is False
    assert needle in res.reason


def test_missing_instruction_list_is_an_error():
    res = safe_score("ifeval", RewardInput(response="hi", ground_truth=""))
    assert res.status == "error" and "instruction_id_list" in res.reason


def test_without_langdetect_language_checks_are_left_out(monkeypatch):
    monkeypatch.setattr(ifeval_text, "_langdetect", False)  # as if the import had failed
    ids = ["language:response_language", "punctuation:no_comma", "change_case:english_lowercase"]
    res = score("Hello, world.", ids, [{"language": "en"}, {}, {}])
    assert res.status == "ok" and res.reward == 0.0
    assert "not checkable: language:response_language" in res.reason
    assert "change_case:english_lowercase" in res.reason and "langdetect" in res.reason
    only = score("Bonjour.", ["language:response_language"], [{"language": "fr"}])
    assert only.status == "error" and "langdetect" in only.reason


def test_undetectable_language_counts_as_followed():
    # langdetect raises on text without letters; IFEval counts that as followed
    res = score("12345 67890", ["language:response_language"], [{"language": "de"}])
    assert res.status == "ok" and res.reward == 1.0


def test_sentence_splitter_protects_abbreviations_and_numbers():
    text = "Dr. Smith paid $3.50 at shop.com for it. Mr. Lee said U.S.A. is big!! Is it?"
    assert ifeval.split_into_sentences(text) == [
        "Dr. Smith paid $3.50 at shop.com for it.", "Mr. Lee said U.S.A. is big!", "Is it?"]
    assert ifeval.split_into_sentences("") == []


def test_registered_factory_builds_the_reward():
    row = RewardInput("No commas.", "", metadata={"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    fn = REWARDS.get("ifeval")(None)  # the schema's defaults: training, with the attempt gate
    assert isinstance(fn, ifeval.IFEvalReward) and fn.require_attempt and fn.score(row).reward == 0.0
    assert REWARDS.get("ifeval")(UPSTREAM_CONFIG).score(row).reward == 1.0


# ---------------------------------------------------------------- edge cases against the reference

@pytest.mark.parametrize("letter,text,count", [
    ("#", "# Title\n## Part one\nText with no hash.", 3),  # both characters occur in the public IFEval data
    ("!", "Wow! Great!! Fine.", 3),
    ("Z", "Zoo buzz.", 3),  # a letter still counts in either case
])
def test_letter_frequency_counts_any_single_character(letter, text, count):
    kw = {"letter": letter, "let_relation": "at least"}
    row = ["keywords:letter_frequency", "punctuation:no_comma"]
    res = score(text, row, [{**kw, "let_frequency": count}, {}])
    assert (res.status, res.reward) == ("ok", 1.0), res  # the row's other instruction is scored too
    assert score(text, row, [{**kw, "let_frequency": count + 1}, {}]).reward == 0.5


@pytest.mark.parametrize("text,expected", [
    ("U.S. U.S.A. A.M. I/O ROCK'N'ROLL", ["U.S.", "U.S.A.", "A.M.", "I/O", "ROCK'N'ROLL"]),
    ("a Ph.D. student", []),  # one word, not all capitals (it used to give the capital word "D")
    ("THIS is VERY-GOOD news, OK", ["THIS", "VERY-GOOD", "OK"]),
    ("DON'T tell JOHN'S boss", ["DO", "N'T", "JOHN", "'S"]),  # contractions split as nltk.word_tokenize does
])
def test_capital_words_keep_abbreviations_and_slashes_whole(text, expected):
    assert [w for w in ifeval.words_for_case(text) if w.isupper()] == expected
    kw = {"capital_frequency": len(expected), "capital_relation": "less than"}
    assert score(text, ["change_case:capital_word_frequency"], [kw]).reward == 0.0
    assert score(text, ["change_case:capital_word_frequency"], [{**kw, "capital_relation": "at least"}]).reward == 1.0


def test_numbered_list_markers_are_not_sentences():
    items = "\n".join(f"{i}. Item number {i} is short." for i in range(1, 11))
    assert len(ifeval.split_into_sentences(items)) == 10  # was 20: each "1." counted as a sentence
    res = score(items, ["length_constraints:number_sentences"], [{"num_sentences": 11, "relation": "less than"}])
    assert res.reward == 1.0


@pytest.mark.parametrize("text,expected", [
    ("We compared apples vs. pears. Prof. Smith agreed.", 2),
    ("See Fig. 3 for details. Mt. Everest is high.", 2),
    ("Apples, pears, etc. are fruit. It weighs approx. 5 kg.", 2),
    ("Open page.html and report.final.pdf now. Then close them.", 2),
    ("See https://example.org/a/page.html?q=1&b=2 now.", 1),
    # where the splitter was right already, it still is
    ("One sentence.This is two.", 2),
    ("Is it?Yes.", 2),
    ("**Done.**Next one.", 2),
    ("First.</p><p>Second one.", 2),
    ("For example, e.g. this one. And Dr. Who.", 2),
])
def test_sentence_splitter_abbreviations_and_names(text, expected):
    assert len(ifeval.split_into_sentences(text)) == expected, ifeval.split_into_sentences(text)


@pytest.mark.parametrize("word,text", [("c++", "I write C++ daily."), ("C#", "Code in c# now"),
                                       ("c++", "c++"), ("#tag", "see #tag.")])
def test_forbidden_words_ending_in_symbols_are_found(word, text):
    assert score(text, ["keywords:forbidden_words"], [{"forbidden_words": [word]}]).reward == 0.0


@pytest.mark.parametrize("word,text", [("c++", "I write c++11 daily."), ("C#", "Csharp, not C"),
                                       ("red", "a reddish sky"), ("#tag", "see a#tag")])
def test_forbidden_words_match_whole_words_only(word, text):
    assert score(text, ["keywords:forbidden_words"], [{"forbidden_words": [word]}]).reward == 1.0


def test_new_splitting_rules_stay_linear_on_hostile_text():
    """Responses are the policy's: the added patterns must not backtrack quadratically. 200k characters of
    each degenerate shape are split and tokenised in well under a second (quadratic would take minutes)."""
    import time

    for text in ("\n" * 200_000, " ?" + "a" * 200_000, "a." * 100_000, "A'" * 100_000, "1.\n" * 70_000):
        t0 = time.process_time()
        ifeval.split_into_sentences(text)
        ifeval.words_for_case(text)
        assert time.process_time() - t0 < 20, repr(text[:10])


@pytest.mark.parametrize("n,need", [(1, 1), (2, 1), (4, 1), (6, 2), (7, 3), (11, 5), (300, 5), ("x", 5)])
def test_attempt_minimum_under_a_word_limit_is_half_the_allowed_words(n, need):
    """Issue 29 review: "fewer than N words" asked for N - 1 distinct words, so "Yes, it is a dog" (N = 6)
    was no attempt; now max(1, (N - 1) // 2), capped by the usual minimum."""
    from nemo_prorl.rewards.ifeval_attempt import attempt_minimum

    ids = ["length_constraints:number_words", "punctuation:no_comma"]
    assert attempt_minimum(ids, [{"num_words": n, "relation": "less than"}, {}], 5) == need
