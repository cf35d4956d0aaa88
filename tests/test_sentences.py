"""Sentence splitter: abbreviations, initials, decimals, quotes and brackets, ellipses, paragraphs."""

import pytest

from anllm_jax.corpus import iter_documents
from anllm_jax.sentences import is_closed, sentence_spans, split_sentences


@pytest.mark.parametrize(
    "text, expected",
    [
        # titles and Latin abbreviations never end a sentence
        (
            "Dr. Smith met Mr. Jones at St. Paul's. They talked.",
            ["Dr. Smith met Mr. Jones at St. Paul's.", "They talked."],
        ),
        ("Eat fruit, e.g. apples, i.e. sweet ones. Fine.", ["Eat fruit, e.g. apples, i.e. sweet ones.", "Fine."]),
        ("Compare cf. Table 2 and Smith vs. Jones. Done.", ["Compare cf. Table 2 and Smith vs. Jones.", "Done."]),
        # dotted acronyms: a break only before a sentence opener
        (
            "The U.S. Army moved. It stayed in the U.S. The war ended.",
            ["The U.S. Army moved.", "It stayed in the U.S.", "The war ended."],
        ),
        (
            "She has a Ph.D. in physics. He left at 5 p.m. on Friday.",
            ["She has a Ph.D. in physics.", "He left at 5 p.m. on Friday."],
        ),
        # abbreviations before numbers
        ("See No. 5 and Fig. 3 on p. 7. Then stop.", ["See No. 5 and Fig. 3 on p. 7.", "Then stop."]),
        (
            "It was born on Jan. 12 in Ohio. It died in 1990. 2001 was later.",
            ["It was born on Jan. 12 in Ohio.", "It died in 1990.", "2001 was later."],
        ),
        (
            "It was built c. 800 AD. It fell in the 2nd c. BCE to raiders.",
            ["It was built c. 800 AD.", "It fell in the 2nd c. BCE to raiders."],
        ),
        # "etc." ends a sentence before a capital; name suffixes only before a sentence opener
        (
            "It is owned by Warner Bros. Entertainment. Robert Lucas Jr. (1995) won. So did Acme Inc. The end.",
            [
                "It is owned by Warner Bros. Entertainment.",
                "Robert Lucas Jr. (1995) won.",
                "So did Acme Inc.",
                "The end.",
            ],
        ),
        ("Apples, pears, etc. The rest is gone.", ["Apples, pears, etc.", "The rest is gone."]),
        ("Apples, pears, etc. are fruit.", ["Apples, pears, etc. are fruit."]),
        # initials
        (
            "It was co-written by Arthur C. Clarke. J. R. R. Tolkien wrote another.",
            ["It was co-written by Arthur C. Clarke.", "J. R. R. Tolkien wrote another."],
        ),
        ("So did I. Then we left.", ["So did I.", "Then we left."]),
        ("Smith et al. Showed this. And et al. The end.", ["Smith et al. Showed this.", "And et al.", "The end."]),
    ],
)
def test_abbreviations_and_initials(text, expected):
    assert split_sentences(text) == expected


def test_decimals_and_inner_dots():
    text = "Pi is 3.14 and e is 2.718. The cost was $4.5 million. Visit example.com today. Version 1.2.3 shipped."
    assert split_sentences(text) == [
        "Pi is 3.14 and e is 2.718.",
        "The cost was $4.5 million.",
        "Visit example.com today.",
        "Version 1.2.3 shipped.",
    ]


def test_quotes_and_brackets_after_the_stop():
    text = 'He said, "Stop." Then he left. "Why?" she asked. (See below.) Next! \u201cReally.\u201d Yes.'
    assert split_sentences(text) == [
        'He said, "Stop."',
        "Then he left.",
        '"Why?" she asked.',
        "(See below.)",
        "Next!",
        "\u201cReally.\u201d",
        "Yes.",
    ]
    # a quoted sentence that continues with a lowercase word is one sentence
    assert split_sentences("'Go away!' he shouted. [Note.] Done.") == ["'Go away!' he shouted.", "[Note.]", "Done."]


def test_question_exclamation_and_ellipsis():
    text = "Really? Yes! Why art thou wroth? and why is it so? Wait... Then it came\u2026 It was I know... maybe."
    assert split_sentences(text) == [
        "Really?",
        "Yes!",
        "Why art thou wroth? and why is it so?",
        "Wait...",
        "Then it came\u2026",
        "It was I know... maybe.",
    ]
    assert split_sentences("What?! No way!!") == ["What?!", "No way!!"]


def test_paragraphs_and_trailing_fragment():
    text = "  Heading without stop\n\nFirst line\ncontinues here. Second.\n \n\tlast fragment  \n"
    assert split_sentences(text) == [
        "Heading without stop",
        "First line\ncontinues here.",
        "Second.",
        "last fragment",
    ]
    assert split_sentences("") == []
    assert split_sentences(" \n\n ") == []


@pytest.mark.parametrize(
    "text, closed",
    [
        ("The river rose.", True),
        ("Why did it rise?  ", True),
        ("It rose!\n", True),
        ("It rose…", True),
        ("It rose...", True),
        ('He said "it rose."', True),
        ("He said «it rose.»", True),
        ("(It rose.)", True),
        ("{It rose.}", True),
        ("It rose in the U.S.", True),
        ("The capital of France is", False),
        ("The value is 3.5", False),
        ("It was written by Dr.", False),
        ("Some fruit, e.g.", False),
        ("", False),
    ],
)
def test_is_closed_uses_the_splitters_terminators_and_closers(text, closed):
    assert is_closed(text) is closed
    # wherever a text is closed, the splitter ends a sentence there when a new one follows
    if closed:
        assert split_sentences(text + " The next one.")[-1] == "The next one."


def test_spans_cover_all_text_on_real_corpus():
    """On real Wikipedia and Bible text the spans are ordered, disjoint and hold every non-space character."""
    docs = [d.text for d in iter_documents("registry", max_docs=150)]
    n_sentences = 0
    for text in docs:
        spans = sentence_spans(text)
        n_sentences += len(spans)
        prev_end = 0
        for a, b in spans:
            assert prev_end <= a < b
            assert not text[prev_end:a].strip()  # only whitespace between sentences
            assert text[a] == text[a:b].strip()[0] and text[b - 1] == text[a:b].strip()[-1]
            prev_end = b
        assert not text[prev_end:].strip()
    # real prose: many sentences, few of them tiny (a tiny one means a wrong split)
    sentences = [s for t in docs for s in split_sentences(t)]
    assert n_sentences > 5 * len(docs)
    assert sum(len(s.split()) < 3 for s in sentences) < 0.02 * len(sentences)
