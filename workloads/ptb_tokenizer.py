"""COCO caption tokenization in pure Python: what pycocoevalcap's PTBTokenizer produces, without Java.

pycocoevalcap (the COCO caption evaluation code) writes every caption of a
batch on its own line (newlines inside a caption become spaces), runs Stanford
CoreNLP 3.4.1's ``edu.stanford.nlp.process.PTBTokenizer -preserveLines
-lowerCase`` on the file, drops the tokens in its ``PUNCTUATIONS`` list from
each output line, and BLEU / CIDEr split what is left on whitespace. This
module reproduces that pipeline: `ptb_tokenize_lines` is the Java tokenizer's
output (lower-cased, one token list per line) and `coco_tokenize` the strings
pycocoevalcap hands to its scorers.

Where it follows the PTB lexer (the 2014 PTBLexer.flex of CoreNLP 3.4.1; each
rule below was checked against that jar's output):

- longest match over all rules, the earlier rule winning a tie, with trailing
  context counted in the length (JFlex semantics);
- brackets become ``-LRB-`` ``-RRB-`` ``-LSB-`` ``-RSB-`` ``-LCB-`` ``-RCB-`` and,
  lower-cased, stay: pycocoevalcap's list names only the upper-case forms;
  a double quote becomes two backquotes or two apostrophes, curly quotes
  likewise, dashes ``--``, ellipses ``...`` (all on the punctuation list);
- clitics split as in the Treebank (``dog 's``, ``do n't``, ``ca n't``,
  ``they 'd 've``), assimilations too (``can not``, ``gon na``, ``wan na``,
  ``'t is``), while ``'90s``, ``o'clock``, ``ma'am``, ``'em``, ``'n'`` stay whole;
- numbers keep their separators (``1,000``, ``10:30``, ``3.5``), fractions their
  slash (``1/2``; ``1 1/2`` is one token with a no-break space, which the
  scorers' whitespace split cuts again), ``½`` becomes ``1/2``; hyphenated words
  stay whole, ``1.5kg`` splits;
- abbreviations and acronyms of the lexer's lists keep their period (``u.s.``,
  ``a.m.``, ``mr.``, ``st.``, ``etc.``, ``calif.``; several state names only when
  capitalized, e.g. ``Wash.`` but not ``wash.``); before a capitalized sentence
  start (``The``, ``He`` ...) an acronym gives back its period, and a single
  letter loses it (``plan A. The`` -> ``a . the``);
- ``!!!``, ``?!`` and symbols (``&``, ``%``, ``$``, ``#``, ``*``, ``+``) are tokens
  that the punctuation list does not drop; characters the lexer cannot tokenize
  (emoji) are deleted; ``€``/``£``/``¢`` become ``$``/``#``/``cents``.

Known gaps, all rare in captions: URLs, e-mail addresses and SGML tags are
recognized only roughly, and a carriage return, which Java takes as a line
break (shifting every later caption in pycocoevalcap itself), is a space here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
"""pycocoevalcap's ``PUNCTUATIONS``, verbatim: compared with the lower-cased tokens, so brackets survive."""

# ---------------------------------------------------------------- macros (PTBLexer.flex names)

_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
# Python's \w also takes numeric characters that are not digits (½, ², ①); PTB's letters do not.
# The rules are compiled twice: exactly, and without this look-ahead for text that has no such character.
_NUMERIC = "".join(re.escape(c) for c in map(chr, range(0x10000)) if c.isnumeric() and not c.isdecimal())
_NOT_NUMERIC = f"(?![{_NUMERIC}])"
_LETTER = rf"(?:{_NOT_NUMERIC}[^\W\d_]|\u00AD|&[aeiouAEIOU](?:acute|grave|uml);)"
_ALNUM = rf"(?:{_NOT_NUMERIC}[^\W_]|\u00AD)"
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z]*[A-MO-Za-mo-z]"
_SREDAUX = rf"[nN]{_APOSETC}[tT]"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\n\u000B\u000C\u2028\u2029]"
_SGML = r"</?[A-Za-z!?][^>\n]*>"
_NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
_ACRO = (
    r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-[Uu]\.[Ss]"
    r"|[Uu]\.[Ss]\.-(?:[Uu]\.[Kk]|[Uu]\.[Ss]\.[Ss]\.[Rr]))"
)
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+"
# Abbreviations: the literal letters are case-insensitive (JFlex %caseless), character
# classes are not, so "Wash." is an abbreviation and "wash." a word and a period.
_ABBREV1 = (
    r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thurs|thu|fri"
    r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo"
    r"|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|ed\.d|ph\.d|blvd|rd|esq"
    r"|etc|al|seq|bldg)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    r"|[Pp]{1,2}[Tt][ye][Ss]?)\."
)
_ABBREV2 = (
    r"(?:" + _ACRO + r"|(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt"
    r"|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr"
    r"|sfc|vs|alex|wm|jos|cie|cf|treas|ph|invt|elec|natl|dept|a\.k\.a)|M(?i:iss)|[Mm][ft][Gg]|v)\."
)
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
# Capitalized words after which an acronym ends its sentence (3.4.1's list; first letter case-sensitive).
_STARTS = (
    "A|About|According|Additionally|After|An|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|Mr\\.|"
    "Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|We|When|While|"
    "What|Yet|You"
)
_SENTENCE_START = "(?:" + "|".join(w[0] + "(?i:" + w[1:] + ")" if len(w) > 1 else w for w in _STARTS.split("|")) + ")"
_THING = rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+(?:[-_\u058A\u2010\u2011](?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+)*"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00AD]+))+"
_FILE_EXTENSIONS = (
    "(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps"
    "|py|sql|tar|txt|wav|x|xml|zip)"
)
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_MISC = (
    "+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u2016\u2017"
    "\u201a\u201e\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u2bff"
    "\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u00a5\u20a4"
)

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_FRACTIONS = dict(zip("¼½¾⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞", "1/4 1/2 3/4 1/3 2/3 1/5 2/5 3/5 4/5 1/6 5/6 1/8 3/8 5/8 7/8".split()))
_CURRENCY = {"¢": "cents", "£": "#", "€": "$", "\u0080": "$"}
_LEFT_QUOTES = {"`": "`", "\u0091": "`", "\u2018": "`", "\u2039": "`", "\u0093": "``", "\u201c": "``", "\u00ab": "``"}


def _quotes(text: str) -> str:
    """LaTeX-style quotes (PTB3 escaping): left ones become ` or ``, right ones ' or ''."""
    out = []
    for ch in text:
        if ch in _LEFT_QUOTES:
            out.append(_LEFT_QUOTES[ch])
        else:
            out.append("''" if ch in "\u0093\u0094\u201d\u00bb" else "'")
    return "".join(out)


def _apostrophes(text: str) -> str:
    """A clitic with its quote characters made ASCII, LaTeX style ("’s" -> "'s", "n‘t" -> "n`t")."""
    return re.sub(r"[\u0092\u2019]|&apos;", "'", re.sub(r"[\u0091\u2018\u201B]", "`", text))


# Rule actions (see `_apply`).
_KEEP, _QUOTE, _CLITIC = "keep", "quote", "clitic"


# The lexer's rules in PTBLexer.flex order: (pattern, action, argument). A pattern may name its
# token ``t`` and its trailing context ``c``; the context counts in the longest match, as in JFlex.
_SPECS: list[tuple[str, str, object]] = [
    (_SGML, "nbsp", None),
    (r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "const", "--"),
    (r"&amp;", "const", "&"),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#\d+);", _KEEP, None),
    (r"(?i:cannot|gonna|gotta|lemme|gimme|wanna)", "split", 3),
    (r"'(?i:tis|twas)", "split", 2),
    (rf"(?P<t>{_WORD})(?P<c>{_REDAUX})", _KEEP, None),
    (rf"(?P<t>{_SWORD})(?P<c>{_SREDAUX})", _KEEP, None),
    (_WORD, _KEEP, None),
    # APOWORD, one alternative per rule so that the longest wins
    (rf"{_APOS}[nN]{_APOS}?", _KEEP, None),
    (rf"[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}", _KEEP, None),
    (rf"{_APOS}(?i:em|cause|till?)|{_APOS}[2-9]0[sS]", _KEEP, None),
    (rf"[A-HJ-XZn]{_APOSETC}{_LETTER}{{2,}}", _KEEP, None),
    (rf"[A-Za-z][A-Za-z]*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z][A-Za-z]*", _KEEP, None),
    (
        rf"(?i:cont{_APOS}d\.?|nor{_APOS}easter|c{_APOS}mon|e{_APOS}er|s{_APOS}mores|ev{_APOS}ry|li{_APOS}l"
        rf"|nat{_APOS}l|cap{_APOS}n|c{_APOS}est)",
        _KEEP,
        None,
    ),
    (rf"(?P<t>[Yy]{_APOS})(?P<c>{_LETTER})", _KEEP, None),
    (r"https?://[^\s\"<>|(){}]+[^\s\"<>|.!?(){},-]", _KEEP, None),
    (
        r"(?P<t>(?:www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
        r"|(?:(?:[^\s\"`'<>|.!?(){}\x2C-\x5F$]+\.)+(?i:com|net|org|edu)))(?P<c>[^A-Za-z])",
        _KEEP,
        None,
    ),
    (r"[a-zA-Z0-9][^\s\"<>|(){}]*@(?:[^\s\"<>|(){}.]+\.)*[^\s\"<>|(){}\[\].,;:]+", _KEEP, None),
    (rf"@[A-Za-z_][A-Za-z_0-9]*|#{_LETTER}+", _KEEP, None),
    (r"[cC]\+\+|[cCfF]#", _KEEP, None),
    (rf"(?P<t>{_REDAUX})(?P<c>[^A-Za-z])", _CLITIC, None),
    (_SREDAUX, _CLITIC, None),
    (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", _KEEP, None),
    (rf"[\-+]?{_NUM}", _KEEP, None),
    (r"(?:\d{1,4}[- \u00A0])?\d{1,4}\\?/\d{1,4}", "nbsp", None),
    ("[" + "".join(_FRACTIONS) + "]", "map", _FRACTIONS),
    (r"-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|C\.D\.s|(?i:pro|anti)-|S&P-500|S&Ls", _KEEP, None),
    (_THING3, _KEEP, None),
    (r"[A-Z]*\$|#", _KEEP, None),
    ("[¢£¤\u0080\u20a0\u20ac\u060b\u0e3f\uffe0\uffe1\uffe5\uffe6]", "map", _CURRENCY),
    (rf"(?P<t>{_ACRO}\.)(?P<c>{_SPACENL}+{_SENTENCE_START}{_SPACENL})", "acronym", None),
    (rf"(?P<t>{_ABBREV3})(?P<c>{_SPACENL}?\d)", _KEEP, None),
    (rf"(?P<t>{_ABBREV1})(?P<c>{_SPACENL}(?:{_SPACENL}|[A-Z\u00C0-\u00DE]|{_SGML}))", "period_again", None),
    (rf"(?P<t>{_ABBREV1})(?P<c>[\s\S]{{2}})", _KEEP, None),
    (_ABBREV1, "period_again", None),  # at the end of the text
    (_ABBREV2, _KEEP, None),
    (rf"(?P<t>{_APOS}\d\d)(?P<c>{_SPACENL})", _KEEP, None),
    (rf"(?P<t>{_WORD}\.)(?P<c>[,;:])", _KEEP, None),
    (rf"(?P<t>(?:{_LETTER}|\d)+(?:\.(?:{_LETTER}|\d)+)*\.{_FILE_EXTENSIONS})(?P<c>\s|[.?!,])", _KEEP, None),
    (r"\(\d{3}\) ?\d{3}[\- ]\d{4}", "phone", None),
    (r"(?P<t>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])(?P<c>[^A-Za-z0-9])", "brackets", None),
    (r"(?P<t>\"|&quot;)(?P<c>[A-Za-z0-9$])", "const", "``"),
    (r"\"|&quot;", "const", "''"),
    (r"<<|>>|<|>|&lt;|&gt;", "map", {"&lt;": "<", "&gt;": ">"}),
    (r"[()\[\]{}]", "brackets", None),
    (r"-+", "hyphens", None),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", "const", "..."),
    (r"@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:]|[?!]+|\.|=|/", _KEEP, None),
    (_HTHING, _KEEP, None),
    (_THING, _KEEP, None),
    (r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", "amp", None),
    (r"(?P<t>')(?P<c>[A-Za-z][^\s])", "const", "`"),
    (_REDAUX, _CLITIC, None),
    (r"''|``|['`]|[\u0091-\u0094\u2018\u2019\u201c\u201d\u00ab\u00bb\u2039\u203a]{1,2}|&apos;", _QUOTE, None),
    (f"[{_MISC}]", _KEEP, None),
]
_RULES = [(re.compile(p if "(?P<t>" in p else f"(?P<t>{p})"), action, arg) for p, action, arg in _SPECS]
_RULES_NO_NUMERIC = [(re.compile(p.pattern.replace(_NOT_NUMERIC, "")), action, arg) for p, action, arg in _RULES]
_HAS_NUMERIC = re.compile(f"[{_NUMERIC}]")
# Fast path for the common case, equal to the rules: a plain word, then perhaps one punctuation mark, before
# a space (a word before its period goes the long way when it is an abbreviation).
_SIMPLE = re.compile(r"\s*([A-Za-z]+)([,;:!?]|\.(?![ \u00A0]\.))?(?=\s|\Z)")
_SPACES = re.compile(r"\s*")
_CHUNK = re.compile(r"\S+")
_CACHEABLE = re.compile(r"(?!.*\(\d{3}\)\Z)[^<\s]*[^<\s.\d]")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})
_ABBREVIATION = re.compile(f"{_ABBREV1}|{_ABBREV2}|{_ABBREV3}")


@functools.lru_cache(maxsize=4096)
def _plain(word: str, period: bool) -> bool:
    """Whether a simple word is a token of its own (not split, and not an abbreviation before its period)."""
    if word.lower() in _SPLIT_WORDS:
        return False
    return not period or (len(word) > 1 and _ABBREVIATION.fullmatch(word + ".") is None)


def _apply(action: str, arg, token: str, start: int) -> tuple[list[str], int]:
    """The tokens an action emits and where lexing resumes (JFlex ``yypushback`` moves it back)."""
    end = start + len(token)
    if action == _KEEP:
        return [token], end
    if action == "const":
        return [arg], end
    if action == "map":
        return [arg.get(token, token) if isinstance(arg, dict) else token], end
    if action == _CLITIC:
        return [_apostrophes(token)], end
    if action == _QUOTE:
        return [_quotes(token) if token != "&apos;" else "'"], end
    if action == "split":
        return [token[:arg]], start + arg
    if action == "amp":
        return [token.replace("&amp;", "&")], end
    if action == "nbsp":
        return [token.replace(" ", "\u00a0")], end
    if action == "hyphens":
        return ["--" if 3 <= len(token) <= 4 else token], end
    if action == "brackets":
        return ["".join(_BRACKETS.get(ch, ch) for ch in token)], end
    if action == "phone":
        return ["".join(_BRACKETS.get(ch, ch) for ch in token).replace(" ", "\u00a0")], end
    if action == "acronym":
        # An acronym before a sentence start gives its period back; a lone letter loses it.
        return ([token[0]], start + 1) if len(token) == 2 else ([token], end - 1)
    if action == "period_again":
        return [token], end - 1
    raise AssertionError(action)


def _next_token(text: str, pos: int, rules) -> tuple[list[str], int]:
    """The tokens of the longest (then earliest) rule matching at ``pos`` and where lexing resumes."""
    best = None
    for pattern, action, arg in rules:
        m = pattern.match(text, pos)
        if m is not None and (best is None or m.end() > best[0].end()):
            best = (m, action, arg)
    if best is None:
        return [], pos + 1  # untokenizable: deleted, as PTBTokenizer does by default
    m, action, arg = best
    tokens, resume = _apply(action, arg, m.group("t"), pos)
    return tokens, max(resume, pos + 1)


@functools.lru_cache(maxsize=65536)
def _chunk_tokens(chunk: str) -> tuple[tuple[int, str], ...]:
    """(offset, token) pairs of a space-delimited chunk whose tokens depend on nothing after the space."""
    text, pos, out = chunk + " ", 0, []
    rules = _RULES if _HAS_NUMERIC.search(chunk) else _RULES_NO_NUMERIC
    while pos < len(chunk):
        start = pos
        tokens, pos = _next_token(text, pos, rules)
        out.extend((start, t) for t in tokens)
        pos = _SPACES.match(text, pos).end()
    return tuple(out)


def _lex(text: str) -> list[tuple[int, str]]:
    """(start offset, token) pairs of PTBLexer on ``text``, tokens as printed before lower-casing.

    Common shapes take shortcuts that give the rules' answer: a plain word (with one mark), or a chunk
    between spaces that no rule can read past (one not ending in a period or digit, without ``<``), lexed
    once and cached; everything else goes through the rules one token at a time."""
    out: list[tuple[int, str]] = []
    pos, n = 0, len(text)
    rules = _RULES if _HAS_NUMERIC.search(text) else _RULES_NO_NUMERIC
    while True:
        simple = _SIMPLE.match(text, pos)
        if simple is not None and _plain(simple.group(1), simple.group(2) == "."):
            out.append((simple.start(1), simple.group(1)))
            if simple.group(2):
                out.append((simple.start(2), simple.group(2)))
            pos = simple.end()
            continue
        pos = _SPACES.match(text, pos).end()
        if pos >= n:
            return out
        chunk = _CHUNK.match(text, pos)
        if chunk.end() < n and _CACHEABLE.fullmatch(chunk.group()):
            out.extend((pos + offset, t) for offset, t in _chunk_tokens(chunk.group()))
            pos = chunk.end()
            continue
        start = pos
        tokens, pos = _next_token(text, pos, rules)
        out.extend((start, t) for t in tokens)


def ptb_tokenize_lines(lines: Iterable[str]) -> list[list[str]]:
    """Stanford PTBTokenizer ``-preserveLines -lowerCase`` on the lines joined by newlines, as
    pycocoevalcap runs it: one list of lower-cased tokens per line. Newlines inside a line become
    spaces first, as pycocoevalcap does; the lines are lexed as one text, so an acronym at the end
    of a line sees the next line's first word, as in Java."""
    lines = [str(line).replace("\n", " ").replace("\r", " ") for line in lines]
    text = "\n".join(lines)
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    out: list[list[str]] = [[] for _ in lines]
    line, last = 0, len(lines) - 1
    for offset, token in _lex(text):  # offsets increase
        while line < last and offset >= starts[line + 1]:
            line += 1
        out[line].append(token.lower())
    return out


def ptb_tokenize(text: str) -> list[str]:
    """PTBTokenizer's lower-cased tokens of one caption (see `ptb_tokenize_lines`)."""
    return ptb_tokenize_lines([text])[0]


def coco_tokenize(captions: Sequence[str]) -> list[str]:
    """What pycocoevalcap's ``PTBTokenizer.tokenize`` returns for a batch of captions, in order: each
    caption's PTB tokens without the ``PUNCTUATIONS``, joined by single spaces."""
    return [" ".join(t for t in tokens if t not in PUNCTUATIONS) for tokens in ptb_tokenize_lines(captions)]


def caption_words(captions: Sequence[str]) -> list[list[str]]:
    """The words BLEU and CIDEr count for each caption of a batch: `coco_tokenize`, split on whitespace
    (``str.split``, which also cuts the no-break space inside ``1 1/2``), as pycocoevalcap's scorers do."""
    return [c.split() for c in coco_tokenize(captions)]
