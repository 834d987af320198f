"""HTML reports: every outside string escaped, nothing fetched from the network, the expected rows
in the page — checked on the markup and, when Chromium is installed, in a real headless browser.

Browser tests need Debian's ``chromium`` and ``chromium-driver`` packages and the Python package
``selenium``; they are skipped (with the reason) otherwise. Set ``PROTOPNET_SCREENSHOTS=DIR`` to
keep the screenshots they take.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import protopnet
from protopnet.demo import write_demo_report
from protopnet.explain import Html, Report, Section, analyze, explain, write_analysis_report, write_explanation_report
from protopnet.regions import UPSAMPLING_DESCRIPTION

from conftest import ColourDataset, screenshot, tiny_model

XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pushed, saved tiny model whose class 0 is named like a script and always wins."""
    data = ColourDataset(num_classes=3, per_class=3, image_size=64)
    model = tiny_model(num_classes=3, prototypes_per_class=3, prototype_size=(2, 2), class_names=[XSS, 'a & "b"', "colour_2"])
    model.image_size, model.mean, model.std = 64, data.mean, data.std
    protopnet.push(model, data, batch_size=9)
    with torch.no_grad():
        # class 1 (prototypes 3-5): own prototype 4 with weight 0; others count only through 0 and 7
        model.last_layer.weight[1, :] = 0.0
        model.last_layer.weight[1, 3] = model.last_layer.weight[1, 5] = 1.0
        model.last_layer.weight[1, 0] = -0.7
        model.last_layer.weight[1, 7] = 0.9
        model.last_layer.weight[0, :3] = 5.0  # class 0 wins
    directory = protopnet.save_model(model, tmp_path_factory.mktemp("model") / "model", dataset=data)
    return protopnet.load_model(directory), data


class Page(HTMLParser):
    """Collects tags with their attributes and the text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, css: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (css is None or css in (a.get("class") or "").split())]


def assert_offline(index: Path) -> Page:
    """No external fetch, no script, CSS inline, every picture a data URI or a file next to it."""
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert page.find("style") or "<style>" in text
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is None:
                continue
            assert not re.match(r"^[a-z][a-z0-9+.-]*://", value, re.I), f"{tag} {name}={value!r} fetches from outside"
            if tag == "img" and not value.startswith("data:"):
                assert (index.parent / value).is_file(), f"missing picture {value}"
    return page


# -- building blocks -----------------------------------------------------------------------------

def test_sections_escape_every_string_and_keep_only_trusted_markup(tmp_path):
    report = Report(f"Title {XSS}", subtitle="a < b")
    report.add(Section(f"Metrics {XSS}", header=["<th>", "value"], rows=[[XSS, 0.5], ["bold", Html("<b>kept</b>")]], text="x > y & z", anchor="metrics"))
    with pytest.raises(TypeError, match="escaped"):
        report.add("<b>a plain string would not be escaped</b>")  # type: ignore[arg-type]
    text = report.render()
    assert XSS not in text and text.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4  # <title>, <h1>, <h2>, a cell
    assert "&lt;th&gt;" in text and "x &gt; y &amp; z" in text and "<b>kept</b>" in text and "0.500" in text
    index = report.write(tmp_path / "index.html")
    assert_offline(index)


def test_explanation_report_lists_every_row_and_states_the_upsampling(setup, tmp_path):
    model, data = setup
    e = explain(model, data.load_image(1), top_classes=3)
    index = write_explanation_report([e], tmp_path / "out", picture_rows=2)
    page = assert_offline(index)
    text = index.read_text()
    assert XSS not in text
    rows = page.find("tr", "score-row")
    assert len(rows) == sum(len(s.rows) for s in e.classes)
    for sheet in e.classes:
        assert sum(1 for r in page.find("table", "score-sheet") if r["data-class-index"] == str(sheet.class_index)) == 2  # pictured + "more"
    sheet1 = e.sheet(1)
    assert {r.match.prototype for r in sheet1.rows} == {0, 3, 4, 5, 7}
    assert {r.match.prototype for r in sheet1.rows if r.negative_reasoning} == {0, 7}
    section = text.split('id="class-1"', 1)[1].split("</section>", 1)[0]
    assert section.count("negative reasoning</span>") == 2 and section.count('class="score-row') == 5
    assert "This part looks like that prototype" in text and "points for <q>&lt;script&gt;" in text
    assert UPSAMPLING_DESCRIPTION in text
    assert len(page.find("img")) > 10


def test_save_html_is_a_single_self_contained_file(setup, tmp_path):
    model, data = setup
    e = explain(model, data.load_image(2))
    path = e.save_html(tmp_path / "alone" / "explanation.html")
    page = assert_offline(path)
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.find("img") if "src" in a)
    assert list(path.parent.iterdir()) == [path]


def test_analysis_report_accepts_extra_sections(setup, tmp_path):
    model, data = setup
    analysis = analyze(model, {"train": data, "test": ColourDataset(num_classes=3, per_class=2, image_size=64, seed=1)}, k=2, batch_size=5)
    extra = Section("Interpretability metrics", header=["metric", "value"], rows=[[f"consistency {XSS}", 0.75]])
    index = write_analysis_report(analysis, tmp_path / "analysis", extra_sections=[extra])
    page = assert_offline(index)
    text = index.read_text()
    assert XSS not in text and "consistency &lt;script&gt;" in text and "0.750" in text
    assert len(page.find("div", "prototype-card")) == model.num_prototypes
    links = [a["href"] for a in page.find("a") if a.get("href", "").startswith("#prototype-")]
    ids = {a.get("id") for _, a in page.tags}
    assert links and all(link[1:] in ids for link in links)
    assert len(page.find("figure", "nearest-patch")) == 2 * 2 * model.num_prototypes


def test_demo_report_explains_the_chosen_test_images(setup, tmp_path):
    model, data = setup
    figures = {"test_accuracy": 0.875, "localization": 0.5, "prototypes": 9, "model": "somewhere"}
    index = write_demo_report(model, data, [0, 4], tmp_path / "demo", figures)
    page = assert_offline(index)
    text = index.read_text()
    assert "87.5%" in text and "somewhere" not in text  # known figures only, formatted
    assert len(page.find("h2", "demo-image")) == 2 and XSS not in text
    ids = [a["id"] for _, a in page.tags if "id" in a]
    assert len(ids) == len(set(ids))  # two explanations on one page, no clashing anchors
    for n, i in enumerate([0, 4], start=1):
        e = explain(model, data.load_image(i), top_classes=2)
        assert sum(1 for a in page.find("table", "score-sheet") if a["data-class-index"] == str(e.predicted)) >= 1
        assert (tmp_path / "demo" / "explanations" / f"{n:02d}.json").is_file()
    assert len(page.find("tr", "score-row")) == sum(len(s.rows) for i in (0, 4) for s in explain(model, data.load_image(i), top_classes=2).classes)


# -- in a real browser ----------------------------------------------------------------------------

def assert_no_alert_and_pictures_loaded(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert driver.execute_script("return document.scripts.length") == 0
    broken = driver.execute_script("return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert broken == []


@pytest.mark.browser
def test_explanation_report_in_a_browser(browser, setup, tmp_path):
    from selenium.webdriver.common.by import By

    model, data = setup
    e = explain(model, data.load_image(4), top_classes=3)
    assert e.predicted_name == XSS
    index = write_explanation_report([e], tmp_path / "out", picture_rows=3)
    browser.get(index.as_uri())
    assert_no_alert_and_pictures_loaded(browser)
    assert browser.find_element(By.CSS_SELECTOR, ".predicted-class").text == XSS  # rendered as text
    for sheet in e.classes:
        section = browser.find_element(By.ID, f"class-{sheet.class_index}")
        assert len(section.find_elements(By.CSS_SELECTOR, "tr.score-row")) == len(sheet.rows)
        assert len(section.find_elements(By.CSS_SELECTOR, "tr.score-row img")) == 4 * min(3, len(sheet.rows))
        assert section.find_element(By.CSS_SELECTOR, ".sheet-total").text == f"{sheet.logit:.3f} points".replace("-", "\u2212")
        first = section.find_element(By.CSS_SELECTOR, "tr.score-row td.points").text
        assert first == f"{sheet.rows[0].points:.2f}".replace("-", "\u2212")
    assert "bicubic" in browser.find_element(By.ID, "how-to-read").text
    screenshot(browser, tmp_path, "explanation")


@pytest.mark.browser
def test_analysis_report_in_a_browser(browser, setup, tmp_path):
    from selenium.webdriver.common.by import By

    model, data = setup
    analysis = analyze(model, {"train": data, "test": ColourDataset(num_classes=3, per_class=2, image_size=64, seed=1)}, k=3, batch_size=9)
    index = write_analysis_report(analysis, tmp_path / "analysis", extra_sections=[Section("Interpretability metrics", header=["metric", "value"], rows=[[XSS, 1.0]])])
    browser.get(index.as_uri())
    assert_no_alert_and_pictures_loaded(browser)
    cards = browser.find_elements(By.CSS_SELECTOR, ".prototype-card")
    assert len(cards) == model.num_prototypes
    groups = browser.find_elements(By.CSS_SELECTOR, ".class-group h3")
    assert [g.text for g in groups] == model.class_names
    purity = analysis.purity("train")
    shown = [c.find_element(By.CSS_SELECTOR, '.purity[data-split="train"]').text for c in cards]
    assert shown == [f"{100 * p:.1f}%" for p in purity]
    cards[4].find_element(By.TAG_NAME, "a").click()
    assert browser.execute_script("return location.hash") == "#prototype-4"
    detail = browser.find_element(By.ID, "prototype-4")
    assert len(detail.find_elements(By.CSS_SELECTOR, "figure.nearest-patch")) == 2 * 3
    assert browser.find_element(By.CSS_SELECTOR, "section.extra td").text == XSS
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, tmp_path, "analysis")


def test_explanation_html_is_a_fragment_for_other_pages(setup):
    from protopnet.explain import explanation_html, stylesheet

    model, data = setup
    e = explain(model, data.load_image(1), top_classes=2)
    fragment = explanation_html(e, picture_rows=2, classes=[e.predicted], summary=False, top_prototypes=False)
    page = Page(fragment)
    assert "<html" not in fragment and "<style" not in fragment and not page.find("script")
    assert [t["data-class-index"] for t in page.find("table", "score-sheet")] == [str(e.predicted)] * 2  # pictured + "more"
    assert len(page.find("tr", "score-row")) == len(e.sheet(e.predicted).rows) and XSS not in fragment
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.find("img"))
    whole = explanation_html(e)
    assert 'class="predicted-class"' in whole and 'id="top-prototypes"' in whole
    assert ".score-row" not in stylesheet() and "td.points" in stylesheet()
