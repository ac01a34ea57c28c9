"""Caption tokenisation shared by the vocabulary and the metrics.

It reproduces what the COCO caption evaluation does to every caption: the Stanford PTB tokenizer
(CoreNLP 3.4.1, ``-preserveLines -lowerCase``) followed by the removal of punctuation tokens.
So: lower-case; clitics split off ("dog's" -> "dog 's", "don't" -> "do n't", "cannot" ->
"can not", "gonna" -> "gon na"); hyphenated words, decimals, times, thousands and slashed
words kept whole ("black-and-white", "3.5", "10:30", "1,000", "b/w"); a period kept on the
abbreviations and initials that PTB keeps it on ("mr.", "st.", "u.s.", "a.m.", "j."), split off
elsewhere; punctuation tokens dropped; other symbols ("$", "%", "&", "#") kept as tokens.
Vocabulary tokens and evaluation references are therefore made by the same function.

Where this differs from COCO's pipeline, it is on purpose. COCO compares the lower-cased PTB
output with an upper-case "-LRB-"/"-RRB-"/"-LCB-"/"-RCB-" list, so brackets survive there as
"-lrb-" tokens (and "[" "]" as "-lsb-" "-rsb-"); here every bracket is dropped, as that list
intends. Likewise runs such as "!!!" or "??" (single PTB tokens that COCO keeps) are dropped.
A few rare PTB rules are not reproduced (joined all-caps "AT&T", "#hashtag", "y' all",
"<tags>"). Normal caption text tokenises exactly as COCO's evaluation does.
"""

from __future__ import annotations

import re

# Characters that make up the punctuation tokens COCO's evaluation removes (".", ",", "?", "!",
# ":", ";", "-", "--", "...", quotes in every PTB spelling), plus brackets and dashes. A token made
# only of these is dropped.
_PUNCT_CHARS = frozenset(".,?!:;-'\"`()[]{}\u2013\u2014\u2026")
# Kept for callers that test single tokens; tokenize() never returns one of these.
PUNCTUATION = frozenset({"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", "-lsb-", "-rsb-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{",
                         "}", '"'})

# Words after which PTB keeps the period as part of the token (titles, months, days, US states,
# company suffixes, "etc.", "vs.").
_ABBREV = frozenset("""
    mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev
    maj sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mt ft
    adj adv asst assoc ens insp mlle mme msgr sfc jr sr bros blvd rd esq inc co cos corp pty pte
    ltd plc rt bancorp dept bhd assn univ intl sys invt elec natl mfg mtg jan feb mar apr jun jul
    aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif colo conn ct dak fla
    ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo etc vs ph
    tel est ext sq al
""".split())
# ... only when written with a capital first letter (lower-case they are ordinary words).
_ABBREV_CAPITALISED = frozenset("miss az ark del ill la mass ore pa tex wash".split())
# ... only when a number follows ("no. 5", "fig. 3").
_ABBREV_BEFORE_NUMBER = frozenset("no nos prop fig op pp art".split())

# Whole words PTB splits in two.
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}

_CLITIC = re.compile(r"'(?:s|re|ve|ll|d|m)(?![^\W_])", re.IGNORECASE)
_APOSTROPHE_TOKEN = re.compile(
    r"'n'|'(?:n|em)(?![^\W_])|'t(?=(?:is|was)(?![^\W_]))"   # rock 'n' roll, more 'n, 'em, 't is
    r"|(?<![\w'])'\d\d(?:s(?![^\W_])|(?=\s|$))",                 # the '90s, '99
    re.IGNORECASE)
_ACRONYM = re.compile(r"(?:[^\W\d_]\.){2,}(?![^\W_])")
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&#39;": "'"}
_ENTITY = re.compile("|".join(map(re.escape, _ENTITIES)))
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'", "\u201c": '"',
                         "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00a0": " "})
_NON_BMP = re.compile("[\U00010000-\U0010ffff]")  # emoji etc.: PTB cannot tokenise them


def _alnum(ch: str) -> bool:
    return ch.isalnum()


def _next_visible(text: str, i: int) -> str:
    while i < len(text) and text[i].isspace():
        i += 1
    return text[i] if i < len(text) else ""


def _keeps_period(word: str, text: str, dot: int) -> bool:
    """Whether PTB keeps the period at ``text[dot]`` on ``word``."""
    low = word.lower()
    if text[dot + 1:dot + 2] in (",", ";", ":"):
        return True                                            # "field., " cannot end a sentence
    if len(word) == 1 and word.isalpha():                      # initials: "j. smith", "plan b."
        return True
    if low in _ABBREV:
        return True
    if low in _ABBREV_CAPITALISED and word[0].isupper():
        return True
    return low in _ABBREV_BEFORE_NUMBER and _next_visible(text, dot + 1).isdigit()


def _word(text: str, i: int, out: list[str]) -> int:
    """Consume the word starting at ``text[i]`` (plus any clitic it carries); return the new index."""
    n = len(text)
    j = i + 1
    number = text[i].isdigit() or text[i] in ".-"   # still a number so far
    separated = text[i] in ".-"                      # a number with a sign or separator: "-5", "1,000"
    while True:
        while j < n and _alnum(text[j]):
            if text[j].isalpha():
                if number and separated:
                    break                            # "10:30pm" -> "10:30" "pm", "1,000s" -> "1,000" "s"
                number = False
            j += 1
        if j + 1 >= n or not _alnum(text[j + 1]):
            break
        sep, nxt = text[j], text[j + 1]
        digits = number and text[j - 1].isdigit() and nxt.isdigit()
        if sep in "-/":                                          # "black-and-white", "b/w", "3-4"
            number = False
        elif sep == "." and (nxt.isalpha() or digits):         # "dog.the", "5.0.1" ("dog.5" splits)
            separated = True
        elif sep in ":," and digits:                             # "10:30", "1,000"
            separated = True
        elif not (sep == "'" and text[i:j].lower() in ("o", "d", "l", "ma") and nxt.isalpha()):
            break                                                # (else "o'clock", "d'ye", "ma'am")
        j += 1
    token = text[i:j]
    if j < n and text[j] == "'":
        if token[-1:] in ("n", "N") and text[j + 1:j + 2] in ("t", "T") and not (
                j + 2 < n and _alnum(text[j + 2])):
            if len(token) > 1:                                   # "don't" -> "do n't"
                out.append(token[:-1])
            out.append(token[-1] + text[j:j + 2])
            return j + 2
        out.extend(_split_word(token))
        m = _CLITIC.match(text, j)                               # "dog's" -> "dog 's"
        if m:
            out.append(m.group())
            return m.end()
        return j
    if j < n and text[j] == "." and _keeps_period(token, text, j):
        out.append(token + ".")
        return j + 1
    out.extend(_split_word(token))
    return j


def _split_word(token: str) -> list[str]:
    cut = _SPLIT_WORDS.get(token.lower())
    return [token[:cut], token[cut:]] if cut else [token]


def _is_punct(token: str) -> bool:
    return all(c in _PUNCT_CHARS for c in token)


# Plain captions ("A man riding a wave, on a board.") take a shortcut with the same result.
_PLAIN = re.compile(r"[A-Za-z]+(?:,? +[A-Za-z]+)*")


def _plain(text: str) -> list[str] | None:
    """Tokens of ASCII words separated by spaces or ", " with an optional final period, else None."""
    stripped = text.strip(" ")
    body = stripped[:-1] if stripped.endswith(".") else stripped
    if not _PLAIN.fullmatch(body):
        return None
    words = body.replace(",", " ").split()
    if body is not stripped and _keeps_period(words[-1], stripped, len(stripped) - 1):
        return None                                            # "plan b." keeps "b."
    return [piece.lower() for word in words for piece in _split_word(word)]


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` with punctuation removed, as COCO evaluation sees them."""
    plain = _plain(text)
    if plain is not None:
        return plain
    text = _ENTITY.sub(lambda m: _ENTITIES[m.group()], text.translate(_QUOTES))
    text = _NON_BMP.sub("", text)
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if ch.isspace():
            i += 1
        elif ch == "'":
            m = _CLITIC.match(text, i) or _APOSTROPHE_TOKEN.match(text, i)
            if m:                                                # "'s", "'90s", "'n'", "'t is"
                out.append(m.group())
                i = m.end()
            else:
                i += 1                                           # a quote: dropped
        elif (m := _ACRONYM.match(text, i)) is not None:
            out.append(m.group())                                # "u.s.", "a.m.", "e.g."
            i = m.end()
        elif _alnum(ch) or (ch in ".-" and nxt.isdigit() and (ch == "." or i == 0 or not _alnum(text[i - 1]))):
            i = _word(text, i, out)                              # words, ".5", "-5"
        else:
            out.append(ch)                                       # a symbol or punctuation mark
            i += 1
    return [t.lower() for t in out if not _is_punct(t)]


# Words an English caption does not end on: articles, prepositions, conjunctions, possessives and
# the auxiliaries of "a man is ...". A decoded caption reaching one of them continues (or, at the
# length limit, is cut there). ``DecodeOptions.dangling`` (``--dangling``) replaces the list.
DANGLING_EN = ("a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "to", "for", "from", "by", "into",
               "onto", "near", "its", "his", "her", "their", "while", "is", "are")

# The n-gram blocking of every decode unless asked otherwise (caption, evaluate, the API, exported
# model folders), chosen by measurement on Flickr8k val (docs/performance.md, "Decoding defaults").
BLOCK_NGRAMS = 3
