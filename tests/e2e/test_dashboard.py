"""/ui in a real browser (Playwright driving Debian's Chromium) against a real demo node: sign
in with a tenant key and see only that tenant, watch its numbers move under load without a
reload, sign out, sign in as admin and see every tenant. Screenshots are saved as artifacts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gpuvisor.launch import NodeProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(
    os.environ.get("GPUVISOR_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")
)
SHELF_BODY = (
    b'{"inputs":[{"name":"image","shape":[1,3,32,32],"datatype":"FP32","data":['
    + b",".join([b"0.1"] * 3072)
    + b"]}]}"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium; .ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(state_dir=tmp_path_factory.mktemp("node-state")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page raised: {errors}"


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot saved: {path}")
    return path


def _sign_in(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.click("#signin-form button[type=submit]")


def test_tenant_sees_its_own_live_numbers_and_admin_sees_everyone(
    node: NodeProcess, page: Page
) -> None:
    page.goto(f"{node.url}/ui")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()

    _sign_in(page, "gvk_abcdefgh_not-a-real-key")
    expect(page.locator("#signin-error")).to_contain_text("not accepted (401)")
    expect(page.locator("#dashboard")).to_be_hidden()

    retail_key = node.tenant_key("retail")
    _sign_in(page, retail_key)
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#viewer")).to_have_text("tenant retail")
    rows = page.locator("#deployments tbody tr")
    expect(rows).to_have_count(2)
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.deployment)")) == [
        "retail/shelf-detector",
        "retail/sku-lookup",
    ]
    expect(page.locator("#tenants [data-tenant]")).to_have_count(1)
    body = page.locator("body").inner_text()
    for other in ("support", "analytics", "intent-router", "basket-scorer"):
        assert other not in body, f"a retail key saw '{other}'"
    assert page.evaluate("sessionStorage.getItem('gpuvisor.key')") == retail_key
    assert page.evaluate("localStorage.length") == 0

    answered = page.locator('[data-deployment="retail/shelf-detector"] [data-field="ok"]')
    before = int(answered.inner_text())
    page.evaluate("window.__sameDocument = 'not reloaded'")
    with httpx.Client(base_url=node.url, headers=node.auth(retail_key), timeout=30) as http:
        for _ in range(25):
            assert (
                http.post("/v2/models/shelf-detector/infer", content=SHELF_BODY).status_code == 200
            )
    expect(answered).to_have_text(str(before + 25), timeout=10_000)  # polled, not reloaded
    assert page.evaluate("window.__sameDocument") == "not reloaded"
    p99 = page.locator('[data-deployment="retail/shelf-detector"] [data-field="p99"]')
    assert p99.inner_text().endswith(" ms")
    share = page.locator('[data-tenant="retail"] [data-field="share"]').inner_text()
    assert share.endswith("%") and share != "0%"
    _screenshot(page, "dashboard-tenant.png")

    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('gpuvisor.key')") is None

    _sign_in(page, node.admin_key)
    expect(page.locator("#viewer")).to_have_text("admin")
    expect(page.locator("#deployments tbody tr")).to_have_count(4)
    tenants = page.locator("#tenants [data-tenant]")
    expect(tenants).to_have_count(3)
    assert sorted(tenants.evaluate_all("cards => cards.map(c => c.dataset.tenant)")) == [
        "analytics",
        "retail",
        "support",
    ]
    expect(page.locator("#attention li").first).to_contain_text("Nobody is waiting or starving")
    expect(page.locator('[data-device="cpu-0"] .bar.memory .seg')).to_have_count(4)
    path = _screenshot(page, "dashboard.png")
    assert path.stat().st_size > 10_000


def test_a_tenant_with_no_deployments_sees_how_to_add_one(node: NodeProcess, page: Page) -> None:
    admin = node.auth(node.admin_key)
    applied = httpx.post(
        f"{node.url}/api/v1/apply",
        headers=admin,
        content=b"apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: newcomer}\n",
        timeout=30,
    )
    assert applied.status_code == 200, applied.text
    created = httpx.post(
        f"{node.url}/api/v1/keys",
        headers=admin,
        json={"role": "tenant", "tenant": "newcomer"},
        timeout=30,
    )
    page.goto(f"{node.url}/ui/")
    _sign_in(page, created.json()["key"])
    expect(page.locator("#no-deployments")).to_be_visible()
    expect(page.locator("#no-deployments")).to_contain_text("No deployments yet")
    expect(page.locator("#deployments")).to_be_hidden()
    page.reload()  # the key survives a reload of the tab (sessionStorage)
    expect(page.locator("#viewer")).to_have_text("tenant newcomer")
