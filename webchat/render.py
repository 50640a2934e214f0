"""Render untrusted markdown to safe HTML, whole or block by block while a reply streams.

Two walls: markdown-it runs with raw HTML off and an allow-list of link schemes, then
nh3 (ammonia) cleans the result against ``ALLOWED_TAGS`` / ``ALLOWED_ATTRIBUTES``.
Code is highlighted by Pygments with CSS classes (see ``pygments_css``), math becomes
MathML on the server, and images become plain links (the page loads no remote images).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any
from xml.etree.ElementTree import tostring

import nh3
from latex2mathml.converter import convert_to_element as latex_to_element
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml, unescapeAll
from markdown_it.renderer import RendererHTML, RendererProtocol
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

__all__ = [
    "ALLOWED_ATTRIBUTES",
    "ALLOWED_TAGS",
    "LINK_REL",
    "LINK_SCHEMES",
    "StreamRenderer",
    "pygments_css",
    "render_blocks",
    "render_markdown",
    "render_text",
]

# MathML elements and attributes that latex2mathml emits, minus its `href`, `class`,
# `style` and `xmlns` (the HTML parser puts <math> in the MathML namespace anyway) and
# <mo form>: harmless there, but `form` is on the list of names we never emit.
_MATHML_ATTRIBUTES: dict[str, set[str]] = {
    "math": {"display"},
    "menclose": {"notation"},
    "mfrac": {"linethickness"},
    "mi": {"mathvariant"},
    "mn": {"mathvariant"},
    "mo": {
        "accent",
        "fence",
        "lspace",
        "mathvariant",
        "maxsize",
        "minsize",
        "movablelimits",
        "rspace",
        "separator",
        "stretchy",
    },
    "mover": {"accent"},
    "mpadded": {"depth", "height", "lspace", "mathbackground", "voffset", "width"},
    "mphantom": set(),
    "mroot": set(),
    "mrow": {"movablelimits"},
    "mspace": {"depth", "height", "linebreak", "mathbackground", "width"},
    "msqrt": set(),
    "mstyle": {"displaystyle", "mathcolor", "mathsize", "scriptlevel"},
    "msub": set(),
    "msubsup": set(),
    "msup": set(),
    "mtable": {
        "columnalign",
        "columnlines",
        "columnspacing",
        "displaystyle",
        "rowlines",
        "rowspacing",
    },
    "mtd": {"columnalign"},
    "mtext": {"mathvariant"},
    "mtr": set(),
    "munder": set(),
    "munderover": set(),
}

_HTML_ATTRIBUTES: dict[str, set[str]] = {
    "a": {"href"},  # rel and target are set by the sanitizer on every link
    "blockquote": set(),
    "br": set(),
    "button": {"aria-label", "class", "type"},
    "code": {"class"},
    "del": set(),
    "div": {"class"},
    "em": set(),
    "h1": set(),
    "h2": set(),
    "h3": set(),
    "h4": set(),
    "h5": set(),
    "h6": set(),
    "hr": set(),
    "li": set(),
    "ol": {"start"},
    "p": set(),
    "pre": set(),
    "s": set(),
    "span": {"class"},
    "strong": set(),
    "table": set(),
    "tbody": set(),
    "td": {"class"},
    "th": {"class"},
    "thead": set(),
    "tr": set(),
    "ul": set(),
}

# The one allow-list: every tag the sanitizer keeps, and the attributes it keeps on each.
ALLOWED_ATTRIBUTES: dict[str, frozenset[str]] = {
    tag: frozenset(attrs) for tag, attrs in {**_HTML_ATTRIBUTES, **_MATHML_ATTRIBUTES}.items()
}
ALLOWED_TAGS: frozenset[str] = frozenset(ALLOWED_ATTRIBUTES)
LINK_SCHEMES: frozenset[str] = frozenset({"http", "https", "mailto"})
LINK_REL = "noopener noreferrer nofollow"

# Class values each tag may carry; only our own renderer and Pygments emit classes.
_CLASS_RES: dict[str, re.Pattern[str]] = {
    "button": re.compile(r"copy"),
    "code": re.compile(r"language-[\w+#.-]{1,32}"),
    "div": re.compile(r"code|code-head|math|table-wrap"),
    "span": re.compile(r"code-lang|[A-Za-z][A-Za-z0-9]{0,39}"),  # Pygments token classes
    "td": re.compile(r"align-(?:left|center|right)"),
    "th": re.compile(r"align-(?:left|center|right)"),
}
# MathML values stay short words, numbers and lengths: no url(), quotes or markup.
_MATH_VALUE_RE = re.compile(r"[A-Za-z0-9 .#%+-]{0,64}")
_MATH_LENGTH_RE = re.compile(r"[+-]?(\d*\.?\d+)\s*[a-z%]*")
_MATH_LENGTH_ATTRS = frozenset(
    {
        "depth",
        "height",
        "linethickness",
        "lspace",
        "mathsize",
        "maxsize",
        "minsize",
        "rspace",
        "voffset",
        "width",
    }
)
# A length this large could paint math over the rest of the page.
_MATH_MAX_LENGTH = 20.0


def _filter_attribute(tag: str, attr: str, value: str) -> str | None:
    """Keep an allowed attribute only if its value has the expected shape."""
    if attr == "class":
        pattern = _CLASS_RES.get(tag)
        return value if pattern is not None and pattern.fullmatch(value) else None
    if tag == "math" and attr == "display":
        return value if value in ("block", "inline") else None
    if tag == "ol" and attr == "start":
        return value if value.isascii() and value.isdigit() and len(value) < 10 else None
    if tag in _MATHML_ATTRIBUTES:
        if not _MATH_VALUE_RE.fullmatch(value):
            return None
        if attr in _MATH_LENGTH_ATTRS:
            length = _MATH_LENGTH_RE.fullmatch(value)
            if length is not None and float(length.group(1)) > _MATH_MAX_LENGTH:
                return None
    return value


_CLEANER = nh3.Cleaner(
    tags=set(ALLOWED_TAGS),
    # "*": nothing on every tag, or ammonia keeps its default generic `lang` and `title`.
    attributes={"*": set(), **{tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()}},
    attribute_filter=_filter_attribute,
    link_rel=LINK_REL,
    set_tag_attribute_values={"a": {"target": "_blank"}},
    url_schemes=set(LINK_SCHEMES),
    url_relative="deny",
)

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_FENCE_LANG_RE = re.compile(r"[\w+#.-]{1,32}")
_ALIGN_RE = re.compile(r"text-align:(left|center|right)")
_NEWLINE_RE = re.compile(r"\r\n?|\n")
_CHAR_REF_RE = re.compile(r"&#x([0-9A-Fa-f]{1,6});")
# Lone surrogates (JSON can decode "\ud800") can't be encoded as UTF-8 by the sanitizer.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Past this size a code block is shown without highlighting (some lexers are slow).
_MAX_HIGHLIGHT_CHARS = 200_000
# Longer LaTeX than this is shown as source: the converter is not linear.
_MAX_LATEX_CHARS = 4_000

_FORMATTER = HtmlFormatter(nowrap=True)


def _is_allowed_url(url: str, schemes: frozenset[str] = LINK_SCHEMES) -> bool:
    """Tell whether a normalized link target is absolute with an allowed scheme.

    markdown-it has already decoded entities and percent-encoded control characters
    and whitespace, so "java&#x09;script:" arrives as "java%09script:" and fails here.
    """
    match = _SCHEME_RE.match(url)
    return match is not None and match.group(1).lower() in schemes


class _SafeMarkdownIt(MarkdownIt):
    def validateLink(self, url: str) -> bool:
        """Allow links (and images, autolinks) only to http, https and mailto."""
        return _is_allowed_url(url)


@lru_cache(maxsize=64)
def _lexer(lang: str) -> Lexer | None:
    """Return the cached Pygments lexer for a fence language, or None if unknown."""
    try:
        return get_lexer_by_name(lang, stripnl=False, ensurenl=True)
    except ClassNotFound:
        return None


def _code_html(content: str, lang: str) -> str:
    """Return a highlighted code block with its language label and copy button."""
    if not _FENCE_LANG_RE.fullmatch(lang):
        lang = "text"
    lexer = _lexer(lang.lower()) if len(content) <= _MAX_HIGHLIGHT_CHARS else None
    code = highlight(content, lexer, _FORMATTER) if lexer else escapeHtml(content)
    return (
        '<div class="code"><div class="code-head">'
        f'<span class="code-lang">{escapeHtml(lang)}</span>'
        '<button type="button" class="copy" aria-label="Copy code">Copy</button></div>'
        f'<pre><code class="language-{escapeHtml(lang)}">{code}</code></pre></div>\n'
    )


def _render_fence(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    info = unescapeAll(tokens[idx].info).strip()
    return _code_html(tokens[idx].content, info.split(maxsplit=1)[0] if info else "")


def _render_code_block(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    return _code_html(tokens[idx].content, "")


def _render_image(
    self: RendererHTML,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    token = tokens[idx]
    alt = escapeHtml(self.renderInlineAsText(token.children or [], options, env))
    src = str(token.attrGet("src") or "")
    # Inside a link, a second <a> would split the outer one: show the alt text only.
    if token.meta.get("in_link") or not _is_allowed_url(src, frozenset({"http", "https"})):
        return alt
    return f'<a href="{escapeHtml(src)}">\N{FRAME WITH PICTURE} {alt}</a>'


def _char_from_ref(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _latex_to_mathml(latex: str, display: bool) -> str:
    """Convert LaTeX to escaped MathML markup.

    latex2mathml's own `convert` un-escapes its whole output to expand the character
    references it stores as text, which lets `\\text{<b>}` through as markup: expand
    them in the tree instead and let ElementTree escape the rest.
    """
    element = latex_to_element(latex, display="block" if display else "inline")
    for node in element.iter():
        if node.text:
            node.text = _CHAR_REF_RE.sub(_char_from_ref, node.text)
        if node.tail:
            node.tail = _CHAR_REF_RE.sub(_char_from_ref, node.tail)
    return tostring(element, encoding="unicode")


@lru_cache(maxsize=256)
def _math_html(latex: str, display: bool) -> str:
    """Return MathML for LaTeX, or the LaTeX as code if it can't be converted."""
    latex = latex.strip()
    try:
        if len(latex) > _MAX_LATEX_CHARS:
            raise ValueError("too long to convert")
        mathml = _latex_to_mathml(latex, display)
    except Exception:  # the converter raises many types; any failure shows the source
        source = escapeHtml(f"$${latex}$$" if display else f"${latex}$")
        return f"<pre><code>{source}</code></pre>\n" if display else f"<code>{source}</code>"
    return f'<div class="math">{mathml}</div>\n' if display else mathml


def _render_math_inline(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    return _math_html(tokens[idx].content, False)


def _render_math_block(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    return _math_html(tokens[idx].content, True)


def _render_table_open(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    return '<div class="table-wrap"><table>\n'


def _render_table_close(
    self: RendererProtocol,
    tokens: Sequence[Token],
    idx: int,
    options: OptionsDict,
    env: EnvType,
) -> str:
    return "</table></div>\n"


def _align_cells_with_classes(state: Any) -> None:
    """Turn table cells' `style="text-align:…"` into `class="align-…"` (no inline styles)."""
    for token in state.tokens:
        if token.type in ("th_open", "td_open") and token.attrs:
            match = _ALIGN_RE.fullmatch(str(token.attrs.pop("style", "")))
            if match:
                token.attrSet("class", f"align-{match.group(1)}")


def _mark_images_in_links(state: Any) -> None:
    """Flag images that sit inside a link, which must not become links themselves."""
    for block in state.tokens:
        depth = 0
        for token in block.children or ():
            if token.type in ("link_open", "link_close"):
                depth += token.nesting
            elif token.type == "image" and depth > 0:
                token.meta["in_link"] = True


def _build_markdown() -> MarkdownIt:
    md = _SafeMarkdownIt("commonmark", {"html": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    # Currency ("$5 and $10") must stay text: no digits or spaces just inside the dollars.
    # No blank lines inside $$…$$ (as in LaTeX): an unclosed $$ then can't scan the whole
    # reply for its end, nor reach back over a blank line once streaming has moved on.
    md.use(
        dollarmath_plugin,
        allow_labels=False,
        allow_space=False,
        allow_digits=False,
        allow_blank_lines=False,
    )
    md.core.ruler.push("align_cells_with_classes", _align_cells_with_classes)
    md.core.ruler.push("mark_images_in_links", _mark_images_in_links)
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("code_block", _render_code_block)
    md.add_render_rule("image", _render_image)
    md.add_render_rule("math_inline", _render_math_inline)
    md.add_render_rule("math_block", _render_math_block)
    md.add_render_rule("table_open", _render_table_open)
    md.add_render_rule("table_close", _render_table_close)
    return md


# The commonmark preset's maxNesting (20) keeps block parsing far from Python's
# recursion limit; deeper quotes and lists are cut off, not crashed on.
_MD = _build_markdown()


def _parse(text: str, env: EnvType) -> list[Token]:
    return _MD.parse(_SURROGATE_RE.sub("\ufffd", text), env)


def _render_tokens(tokens: Sequence[Token], env: EnvType) -> str:
    return _CLEANER.clean(_MD.renderer.render(tokens, _MD.options, env))


def _fallback_html(text: str) -> str:
    return f"<pre>{render_text(text)}</pre>\n"


def render_markdown(text: str) -> str:
    """Render untrusted markdown to sanitized HTML.

    Nesting deeper than markdown-it's limit (20) is dropped; if parsing still fails the
    text is shown escaped in a <pre>.
    """
    try:
        return _render_tokens(_parse(text, {}), {})
    except RecursionError:
        return _fallback_html(text)


def render_text(text: str) -> str:
    """Escape a user's plain text for HTML; the page shows it with `white-space: pre-wrap`."""
    return html.escape(_SURROGATE_RE.sub("\ufffd", text))


class StreamRenderer:
    """Render a growing reply block by block, each finished block exactly once.

    ``feed`` takes the whole reply so far (it only ever grows) and parses only the
    part after the finished blocks, so the cost is linear in the reply's length,
    except that the open tail is re-parsed on every call (a very long list, table or
    code block costs quadratic time in its own size while it grows).

    The top-level blocks above a block B are finished once B starts after a blank line
    and B's first line is complete. Without the blank line, a table's delimiter row or
    a closing $$ still to come could pull B's lines into the block above; on a partial
    line, "2" may become "2. item" and continue the list above.

    Known divergence from ``render_markdown(full_text)``: a reference-style link
    whose definition comes after the finished block that uses it stays literal text.
    """

    def __init__(self, keep_blocks: bool = True) -> None:
        self._offset = 0  # chars of the reply covered by finished blocks
        self._blocks: list[str] = []  # for ``snapshot``, unless keep_blocks is False
        self._keep_blocks = keep_blocks
        self._count = 0
        self._tail = ""
        self._references: dict[str, Any] = {}  # link definitions from finished text
        self._seen = -1  # for feed_growing: chars of the reply already on the page

    @property
    def blocks_count(self) -> int:
        """Return how many finished blocks have been rendered."""
        return self._count

    def feed(self, text: str) -> tuple[list[str], str]:
        """Return the HTML of blocks finished since the last call, and of the open tail.

        `text` must extend the text of the previous call; this is not checked. The tail
        may hold more than one block, see the class docstring.
        """
        new_blocks, render_tail = self._advance(text)
        self._tail = render_tail()
        return new_blocks, self._tail

    def feed_growing(self, text: str) -> tuple[list[str], str | None, str]:
        """Return ``(finished blocks, new tail HTML or None, raw text to append)``.

        The cheap way to stream: the open tail is rendered only when a block starts
        (when finished blocks leave it); in between, the new characters are returned
        as raw text for the page to append inside the tail's ``span.grow``. The tail
        is parsed again only when a line completes after a blank line (a block can
        only finish there), so each update costs about the size of the new text, and
        each block is rendered once. The raw text shows until its block finishes and
        is rendered (or a snapshot renders everything).
        """
        if self._seen < 0:
            new_blocks, tail = self.feed(text)
            self._seen = len(text)
            return new_blocks, mark_growing(tail), ""
        seen, self._seen = self._seen, len(text)
        added = text[seen:]
        if not added or ("\n" not in added and "\r" not in added):
            return [], None, added
        if not _completes_block_start(text, max(self._offset, _line_above_start(text, seen))):
            return [], None, added
        before = self._offset
        new_blocks, render_tail = self._advance(text)
        if self._offset == before:
            return [], None, added
        self._tail = render_tail()
        return new_blocks, mark_growing(self._tail), ""

    def _advance(self, text: str) -> tuple[list[str], Callable[[], str]]:
        """Move finished blocks out of the tail; return them and how to render the tail."""
        chunk = text[self._offset :]
        env: EnvType = {"references": dict(self._references)}
        try:
            tokens = _parse(chunk, env)
        except RecursionError:
            fallback = _fallback_html(chunk)
            return [], lambda: fallback
        starts = [i for i, t in enumerate(tokens) if t.level == 0 and t.nesting >= 0 and t.map]
        line_starts = [0, *(match.end() for match in _NEWLINE_RE.finditer(chunk))]
        last = len(starts) - 1
        while last > 0 and not _can_cut_at(chunk, line_starts, _start_line(tokens[starts[last]])):
            last -= 1
        new_blocks: list[str] = []
        if last > 0:
            for begin, end in zip(starts[:last], starts[1 : last + 1], strict=True):
                new_blocks.append(_render_tokens(tokens[begin:end], env))
            cut = line_starts[_start_line(tokens[starts[last]])]
            finished = chunk[:cut]
            if "]:" in finished:  # it may define links that later blocks use
                finished_env: EnvType = {"references": dict(self._references)}
                _parse(finished, finished_env)
                self._references = finished_env["references"]
            self._offset += cut
            self._count += len(new_blocks)
            if self._keep_blocks:
                self._blocks.extend(new_blocks)
        tail_tokens = tokens[starts[last] :] if starts else []
        return new_blocks, lambda: _render_tokens(tail_tokens, env) if tail_tokens else ""

    def snapshot(self) -> str:
        """Return all finished blocks and the open tail as one HTML string.

        Caveat: with ``keep_blocks=False`` (a stream's tail, which sends each block
        once and then needs it no more) only the open tail.
        """
        return "".join(self._blocks) + self._tail


# Closing tags of blocks (not of inline elements) at the end of the tail: text grows
# before them. A code block's ``</code>`` counts, an inline one's does not.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _line_above_start(text: str, end: int) -> int:
    """Return where the line above the line open at ``end`` starts (0 if there is none)."""
    open_start = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end)) + 1
    if open_start == 0:
        return 0
    above_end = open_start - 1
    if text[above_end] == "\n" and above_end > 0 and text[above_end - 1] == "\r":
        above_end -= 1  # a CRLF
    return max(text.rfind("\n", 0, above_end), text.rfind("\r", 0, above_end)) + 1


def _completes_block_start(text: str, start: int) -> bool:
    """Tell whether a complete, non-blank line right under a blank line follows ``start``.

    Only such a line can start a block that finishes the blocks above it (see
    ``StreamRenderer``), so only then is the open tail worth parsing again.
    Caveat: ``start`` must be a line start.
    """
    lines = _LINE_BREAK.split(text[start:])
    return any(not lines[i - 1].strip(" \t") and lines[i].strip(" \t")
               for i in range(1, len(lines) - 1))
_TRAILING_CLOSERS = re.compile(
    r"(?:\s*</(?:p|li|ul|ol|pre|div|blockquote|table|tbody|thead|tr|td|th|h[1-6]|math)>"
    r"|\s*</code>(?=\s*</pre>))+\s*$")
GROW = '<span class="grow"></span>'


def mark_growing(tail_html: str) -> str:
    """Put an empty ``span.grow`` where the tail's text ends (inside its last element).

    The page appends the raw text of the still-growing block there.
    """
    match = _TRAILING_CLOSERS.search(tail_html)
    if not tail_html or match is None:
        return tail_html + f"<p>{GROW}</p>"
    return tail_html[: match.start()] + GROW + tail_html[match.start() :]


def _start_line(token: Token) -> int:
    """Return the 0-based line where a block token starts."""
    assert token.map is not None  # block-start tokens always carry their lines
    return token.map[0]


def _can_cut_at(text: str, line_starts: list[int], line: int) -> bool:
    """Tell whether the blocks above `line` are finished: see `StreamRenderer`."""
    if not 0 < line < len(line_starts) - 1:  # no line above, or `line` is not complete
        return False
    above = text[line_starts[line - 1] : line_starts[line]]
    return above.strip(" \t\r\n") == ""


def render_blocks(text: str) -> tuple[list[str], str]:
    """Render `text` as finished blocks and the open last block, as one `feed` would."""
    return StreamRenderer().feed(text)


def _style_rules(style: str, prefix: str) -> str:
    """Return one Pygments style's rules, all scoped under `prefix`."""
    rules: str = HtmlFormatter(style=style).get_style_defs(prefix)  # type: ignore[no-untyped-call]
    # Drop the unscoped `pre` and line-number rules: they would style the whole page.
    return "\n".join(line for line in rules.splitlines() if line.startswith(prefix))


def pygments_css() -> str:
    """Return the CSS for highlighted code: light by default, dark for the dark theme.

    The dark rules apply under `[data-theme=dark]` and, unless `[data-theme=light]`
    is set, when the system prefers a dark scheme.
    """
    return "\n".join(
        [
            _style_rules("default", ".code"),
            _style_rules("github-dark", "[data-theme=dark] .code"),
            "@media (prefers-color-scheme: dark) {",
            _style_rules("github-dark", ":root:not([data-theme=light]) .code"),
            "}",
            "",
        ]
    )
