"""axe-core finds no serious or critical accessibility problems on the main pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import Server

pytestmark = pytest.mark.e2e

AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"


def violations(page: Any) -> list[dict[str, Any]]:
    if not AXE.exists():
        pytest.fail("axe-core is not installed: run `cd tests && npm install` (tests/run.sh does)")
    page.evaluate(AXE.read_text(encoding="utf-8"))
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ["violations"]});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(" ")).slice(0, 5)}));
    }""")
    return [v for v in result if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_main_pages_have_no_serious_violations(live_server: Server, browser: Any, locale: str,
                                               scheme: str) -> None:
    # The test injects axe as a DevTools evaluation, which the page's CSP does not govern.
    context = browser.new_context(locale=locale, color_scheme=scheme,
                                  extra_http_headers={"Accept-Language": locale})
    try:
        page = context.new_page()
        page.goto(live_server.url + "/")
        assert violations(page) == [], "empty chat page"
        page.get_by_role("textbox").first.wait_for()
        box = page.locator("#composer-text")
        box.fill("Accessibility check: a list, code and a table please")
        box.press("Enter")
        page.locator(".msg.assistant[data-status=complete]").wait_for(timeout=30_000)
        assert violations(page) == [], "conversation page"
        page.locator(".conv-menu summary").click()
        assert violations(page) == [], "conversation menu open"
        page.goto(live_server.url + "/search?q=check")
        assert violations(page) == [], "search page"
    finally:
        context.close()
