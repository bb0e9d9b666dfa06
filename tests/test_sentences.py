from __future__ import annotations

from sub300.agent.sentences import SentenceSplitter, clean_for_speech


def split(tokens: list[str], min_clause_chars: int = 12) -> list[str]:
    splitter = SentenceSplitter(min_clause_chars)
    out = []
    for token in tokens:
        out += splitter.push(token)
    return out + splitter.flush()


def test_sentences_come_out_as_soon_as_the_next_token_confirms_them():
    splitter = SentenceSplitter()
    assert splitter.push("The capital of France is Paris.") == []  # could still be "Paris.com"
    assert splitter.push(" It") == ["The capital of France is Paris."]
    assert splitter.flush() == ["It"]


def test_numbers_and_abbreviations_do_not_split():
    assert split(["It costs 3", ".", "5 euros. Dr", ". Smith agrees."]) == ["It costs 3.5 euros.", "Dr. Smith agrees."]


def test_only_the_first_piece_splits_at_a_clause_and_only_when_long_enough():
    assert split(["Yes, the capital of France, as you know, is Paris. Well, ", "it is."]) == [
        "Yes, the capital of France,", "as you know, is Paris.", "Well, it is."]
    assert split(["Yes, indeed."], min_clause_chars=0) == ["Yes,", "indeed."]


def test_markdown_is_not_read_aloud():
    assert clean_for_speech("**Paris** is the `capital`\n- item") == "Paris is the capital item"
    assert split(["*** ", "Hello."]) == ["Hello."]


def test_empty_stream():
    assert split([]) == []
    assert split(["   "]) == []


def test_first_piece_is_cut_after_a_phrase_when_no_punctuation_comes():
    tokens = ["Two", " plus", " two", " is", " a", " mathematical", " operation", " that", " adds.", " Done."]
    assert split(tokens, 12) == ["Two plus two is a mathematical operation that adds.", "Done."]
    splitter = SentenceSplitter(12, first_piece_max_words=6)
    out = []
    for token in tokens:
        out += splitter.push(token)
    assert out + splitter.flush() == ["Two plus two is a mathematical", "operation that adds.", "Done."]
    # a word is only complete once the next one has begun
    splitter = SentenceSplitter(12, first_piece_max_words=2)
    assert splitter.push("Hello wor") == []
    assert splitter.push("ld and") == ["Hello world"]


def test_the_first_piece_is_not_cut_inside_code_next_to_an_operator_or_before_a_number_word():
    def first(tokens: list[str], words: int) -> str:
        splitter = SentenceSplitter(12, first_piece_max_words=words)
        out: list[str] = []
        for token in tokens:
            out += splitter.push(token)
        return (out + splitter.flush())[0]

    assert first(["Use", " `x", " =", " a", " *", " b`", " to", " multiply", " them", " now"], 3) == "Use x = a * b"
    assert first(["So", " x", " =", " a", " *", " b", " is", " the", " answer", " here"], 4) == "So x = a * b"
    assert first(["They", " raised", " $2.5", " million", " from", " investors", " today"], 3) == \
        "They raised $2.5 million"
    assert first(["We", " open", " at", " 9", " a.m.", " every", " day", " now"], 4) == "We open at 9 a.m."
    assert first(["It", " is", " 5", " km", " away", " from", " here", " now"], 3) == "It is 5 km"
    # a clause break inside inline code does not count
    assert first(["Call", " `compute(alpha,", " beta)`", " with", " both,", " then", " go."], 8) == \
        "Call compute(alpha, beta) with both,"


def test_pysbd_cutting_inside_a_url_is_not_taken_but_the_real_end_is():
    assert split(["Visit", " https://acme.co.uk/support?ref=voice.", " We", " are", " open."], 10**6) == [
        "Visit https://acme.co.uk/support?ref=voice.", "We are open."]
