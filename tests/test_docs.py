"""The README's claims that code can check stay true."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["static/vendor/htmx-2.0.11.min.js", "static/vendor/htmx-ext-sse-2.2.4.js",
           "static/app.js"]
STYLES = ["static/app.css", "static/code.css"]


def gzipped_kb(paths: list[str]) -> float:
    return sum(len(gzip.compress((ROOT / p).read_bytes(), 9)) for p in paths) / 1024


def test_the_front_end_weight_in_the_readme_is_current() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"JavaScript: ([\d.]+) KB gzipped.*?CSS: ([\d.]+) KB gzipped", readme, re.S)
    assert match, "the README should state the JavaScript and CSS weight"
    js, css = float(match.group(1)), float(match.group(2))
    assert abs(js - gzipped_kb(SCRIPTS)) < 0.3, f"JavaScript is now {gzipped_kb(SCRIPTS):.1f} KB"
    assert abs(css - gzipped_kb(STYLES)) < 0.3, f"CSS is now {gzipped_kb(STYLES):.1f} KB"


def test_the_page_loads_only_the_vendored_and_own_assets() -> None:
    base = (ROOT / "templates" / "base.html").read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="\{\{ url_for\(.static., filename=.([^\'"]+).\) \}\}"',
                         base)
    scripts = [s for s in sources if s.endswith(".js")]
    assert ["static/" + s for s in scripts] == SCRIPTS
    assert "http://" not in base and "https://" not in base, "no CDN"
