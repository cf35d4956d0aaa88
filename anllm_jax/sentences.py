"""A rule-based English sentence splitter (no model files, no downloads).

AnLLM-AC puts an anchor token after every sentence, so the splitter decides where anchors go. Rules:

- A sentence ends at ".", "?", "!", an ellipsis ("..." or "…") or a run of them, followed by optional closing
  quotes/brackets and then whitespace; the next sentence must start with an uppercase letter or a digit (after
  optional opening quotes/brackets). A following lowercase word never starts a sentence ("e.g. apples",
  '"Why?" she asked').
- A full stop right after a title or other non-final abbreviation ("Dr.", "Mr.", "St.", "e.g.", "i.e.", "cf.",
  "vs.") does not end a sentence.
- Abbreviations usually followed by a number ("No. 5", "Fig. 3", "Jan. 12", "p. 7", "c. 800") do not end a
  sentence before a digit.
- Dotted acronyms ("U.S.", "Ph.D.", "a.m."), single-letter initials ("Arthur C. Clarke", "J. R. R. Tolkien"),
  name suffixes ("Jr.", "Inc.", "Bros.") and "et al." end a sentence only before a common sentence opener
  ("... in the U.S. The ...") and not before other capitalised words ("U.S. Army") or numbers.
- Decimals ("3.14"), URLs and other full stops without following whitespace never split.
- A blank line always ends a sentence (paragraphs and headings), even without punctuation.
- Whatever follows the last terminator (a trailing fragment) is a sentence of its own.
"""

from __future__ import annotations

import re

# fmt: off
# Titles and other abbreviations that precede a name or word and practically never end a sentence.
_NON_FINAL = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "rev", "hon", "st", "mt", "ft", "gen", "col", "lt", "capt", "sgt", "maj",
    "adm", "cmdr", "brig", "gov", "sen", "rep", "pres", "supt", "insp", "messrs", "mme", "mlle", "rt", "fr", "br",
    "e.g", "i.e", "cf", "vs", "viz", "approx", "ca", "c",
})
# Abbreviations that often end a sentence: they break before a capitalised word.
_MAY_END = frozenset({"etc", "esq"})
# Name suffixes that end a sentence only before a sentence opener ("Warner Bros. Entertainment" goes on).
_SUFFIXES = frozenset({"jr", "sr", "inc", "ltd", "co", "corp", "bros", "llc", "plc", "al"})
# Abbreviations that are followed by a number when they do not end the sentence.
_BEFORE_NUMBER = frozenset({
    "no", "nos", "art", "vol", "vols", "p", "pp", "fig", "figs", "eq", "eqs", "ch", "sec", "ser", "op", "nr", "ed",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
# Words that open a sentence; after a dotted acronym ("U.S.") only these mark a sentence start.
_OPENERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "he", "she", "they", "we", "i", "you", "his",
    "her", "their", "our", "my", "there", "here", "in", "on", "at", "as", "after", "before", "but", "and", "or",
    "so", "yet", "however", "when", "while", "if", "although", "though", "since", "because", "what", "which", "who",
    "how", "why", "where", "many", "most", "some", "all", "each", "one", "two", "three", "both", "no", "not", "for",
    "from", "by", "to", "with", "during", "later", "then", "today",
})
# fmt: on

_OPEN = "\"'“‘«([{"
_CLOSE = "\"'”’»)]}"
# A candidate end: the word before the terminator, the terminator run, closing quotes/brackets, whitespace.
_CANDIDATE = re.compile(
    r"(?P<word>\S*?)(?P<term>(?:[.!?…])+)(?P<close>[" + re.escape(_CLOSE) + r"]*)(?P<space>\s+)(?=\S)"
)
# The end of a text whose last sentence is finished: the same terminators and closers as _CANDIDATE.
_CLOSED_END = re.compile(r"(?P<word>\S*?)(?P<term>[.!?…]+)[" + re.escape(_CLOSE) + r"]*$")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_DOTTED_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")


def _first_word(text: str, pos: int, end: int) -> str:
    """The word starting at `pos` (and ending before `end`) without leading opening quotes/brackets."""
    stop = pos
    while stop < end and not text[stop].isspace():
        stop += 1
    return text[pos:stop].lstrip(_OPEN)


def _ends_sentence(word: str, term: str, next_word: str) -> bool:
    """Whether `word` + `term` closes a sentence when `next_word` follows after whitespace."""
    if not next_word:
        return False
    first = next_word[0]
    starts_upper, starts_digit = first.isupper(), first.isdigit()
    if not (starts_upper or starts_digit):
        return False
    if term != ".":
        return True  # "?", "!", "...", "…", "?!" before a capitalised word or a number
    stripped = word.lstrip(_OPEN)
    bare = stripped.lower()
    is_initial = len(stripped) == 1 and stripped.isupper() and stripped != "I"
    opener_only = is_initial or bare in _SUFFIXES or _DOTTED_ACRONYM.fullmatch(stripped) is not None
    if starts_digit:
        # "No. 5", "c. 800", "U.S. 500", "Jr. (1995)" go on; "... in 1990. 2001 ..." ends.
        return not (opener_only or bare in _BEFORE_NUMBER or bare in _NON_FINAL or bare in _MAY_END)
    if bare in _NON_FINAL:
        return False
    if opener_only:
        # "Arthur C. Clarke", "et al. Smith", "U.S. Army" go on; "... in the U.S. The ..." ends.
        return next_word.rstrip(",;:").lower() in _OPENERS
    return True


def _split_paragraph(text: str, start: int, end: int, out: list[tuple[int, int]]) -> None:
    sentence_start = start
    for m in _CANDIDATE.finditer(text, start, end):
        next_pos = m.end()
        if _ends_sentence(m.group("word"), m.group("term"), _first_word(text, next_pos, end)):
            out.append((sentence_start, m.start("space")))
            sentence_start = next_pos
    tail_end = len(text[sentence_start:end].rstrip()) + sentence_start
    if tail_end > sentence_start:
        out.append((sentence_start, tail_end))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each sentence, in order; spans exclude surrounding whitespace."""
    spans: list[tuple[int, int]] = []
    pos = len(text) - len(text.lstrip())
    for m in _PARAGRAPH.finditer(text, pos):
        if m.start() > pos:
            _split_paragraph(text, pos, m.start(), spans)
        pos = m.end()
    if pos < len(text):
        _split_paragraph(text, pos, len(text), spans)
    return spans


def is_closed(text: str) -> bool:
    """Whether the last sentence of `text` is finished: it ends with a terminator and optional closing quotes or
    brackets, and the terminator is not a title's full stop ("Dr.", "e.g.") that a name or word must follow."""
    m = _CLOSED_END.search(text.rstrip())
    if m is None:
        return False
    return m.group("term") != "." or m.group("word").lstrip(_OPEN).lower() not in _NON_FINAL


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, each stripped of surrounding whitespace."""
    return [text[a:b] for a, b in sentence_spans(text)]
