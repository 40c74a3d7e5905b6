"""The web page in a real headless browser (Debian's chromium through chromium-driver and Selenium): it
loads, shows a finished run's curves and answers, two runs side by side, streams a chat answer equal to
`fasttune generate`'s, shows the error of a bad request, and exports a run with its check.

The runs are real: two short trainings of a tiny Llama, written by `fasttune.api.train`. With
FASTTUNE_SCREENSHOTS=DIR each view is saved there as a PNG (docs/ holds the ones the README shows).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import LiveServer, alpaca_ids, reference

ROWS = [
    {"instruction": f"What is the code word number {i}?", "input": "", "output": f"The code word is k{i}."}
    for i in range(12)
]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60
pytestmark = pytest.mark.slow  # two short trainings and a browser: well over ten seconds on two cores


def train_run(root: Path, name: str, model_dir: Path, data: Path, learning_rate: float) -> Path:
    from fasttune import api
    from fasttune.config import RunConfig, apply_overrides

    values = dict(
        model_name=str(model_dir),
        dataset=str(data),
        eval_dataset=str(data),
        max_seq_length=64,
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=learning_rate,
        logging_steps=1,
        eval_steps=3,
        save_steps=100,
        output_dir=str(root / name),
        show_samples=2,
        r=4,
        warmup_steps=0,
        eval_answers=2,
    )
    api.train(apply_overrides(RunConfig(), values, "test"), log=lambda line: None)
    return root / name


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    data = root.parent / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    train_run(root, "alpha", tiny_model_dir, data, 1e-2)
    train_run(root, "beta", tiny_model_dir, data, 3e-3)
    return root


@pytest.fixture(scope="module")
def page_server(runs_root):
    from fasttune.infer.load import load_for_inference

    im = load_for_inference(run=str(runs_root / "alpha"), device="cpu")
    with LiveServer(
        im.model,
        im.tokenizer,
        im.contract,
        slots=2,
        context=160,
        max_queue=4,
        runs_root=runs_root,
        model_id="alpha",
        eos_ids=im.eos_token_ids,
    ) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "chromium and chromium-driver are installed by scripts/setup.sh test"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_script_errors(browser):
    """After each test: the page's JavaScript raised nothing (the browser's console has no error)."""
    browser.get_log("browser")  # drop what earlier tests left
    yield
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
              and e["source"] == "javascript"]
    assert errors == []


def wait_for(driver, condition, message: str):
    """condition(driver) once it is truthy; an element not drawn yet, or redrawn meanwhile (stale), is looked
    up again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # IndexError: the element is not on the page yet
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException, IndexError))
    return wait.until(lambda d: condition(d), message)


def points(driver, run: str, kind: str) -> int | None:
    """The number of points of a run's curve as drawn, or None before it is drawn."""
    lines = by_css(driver, f'polyline[data-run="{run}"][data-kind="{kind}"]')
    return int(lines[0].get_attribute("data-points")) if lines else None


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("FASTTUNE_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / name))


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def test_page_shows_a_finished_runs_curves_answers_and_two_runs_side_by_side(page_server, browser, runs_root):
    from selenium.webdriver.support.ui import Select

    from fasttune.train.metrics import read_metrics

    browser.get(page_server.url + "/")
    wait_for(browser, lambda d: len(by_css(d, "#run-list li")) == 2, "the two runs are listed")
    wait_for(browser, lambda d: by_css(d, '#run-list li[data-run="alpha"]')[0].click() or True, "a click")
    records = read_metrics(runs_root / "alpha" / "metrics.jsonl")
    n_train = sum(r["kind"] == "train" for r in records)
    n_eval = sum(r["kind"] == "eval" for r in records)
    assert n_train == 6
    wait_for(browser, lambda d: points(d, "alpha", "train") == n_train, "the training curve")
    wait_for(browser, lambda d: points(d, "alpha", "eval") == n_eval, "the eval curve")
    wait_for(browser, lambda d: by_css(d, "#run-state")[0].text == "finished", "the run's state")
    saved = json.loads((runs_root / "alpha" / "answers.json").read_text())
    cells = wait_for(browser, lambda d: [td.text for td in by_css(d, "#answers td")], "the answers")
    assert cells[:3] == [
        saved["before"][0]["question"],
        saved["before"][0]["answer"].strip(),
        saved["after"][0]["answer"].strip(),
    ]
    assert "tokens/s (mean)" in by_css(browser, "#summary")[0].text

    wait_for(browser, lambda d: Select(by_css(d, "#compare")[0]).select_by_value("beta") or True, "compare")
    wait_for(
        browser, lambda d: by_css(d, 'polyline[data-run="beta"][data-kind="train"]'), "the second run's curve"
    )
    headers = [th.text for th in by_css(browser, "#summary tr:first-child th")]
    assert headers[1:] == ["alpha", "beta"]
    screenshot(browser, "serve-runs.png")


def test_chat_streams_the_answer_generate_gives(page_server, browser):
    question = "What is the code word number 3?"
    ids = alpaca_ids(page_server.tokenizer, page_server.contract, question)
    expected, _ = reference(
        page_server.model,
        page_server.tokenizer,
        ids,
        max_new_tokens=24,
        eos_ids=page_server.eos_ids,
        stops=list(page_server.contract.stop_strings),
    )
    browser.get(page_server.url + "/#chat")
    wait_for(browser, lambda d: by_css(d, "#model-id")[0].text == "alpha", "the served model's id")
    for field, value in (("temperature", "0"), ("max_tokens", "24")):
        box = by_css(browser, f"#{field}")[0]
        box.clear()
        box.send_keys(value)
    by_css(browser, "#prompt")[0].send_keys(question)
    by_css(browser, "#send")[0].click()
    answer = wait_for(
        browser,
        lambda d: [m for m in by_css(d, ".msg.assistant") if m.get_attribute("data-done") == "true"],
        "the answer",
    )[0]
    assert answer.get_attribute("textContent") == expected
    assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces
    assert by_css(browser, "#chat-error")[0].is_displayed() is False
    screenshot(browser, "serve-chat.png")


def test_chat_shows_the_error_of_a_bad_request(page_server, browser):
    browser.get(page_server.url + "/#chat")
    wait_for(browser, lambda d: by_css(d, "#model-id")[0].text == "alpha", "the served model's id")
    by_css(browser, "#reset")[0].click()  # a new conversation
    box = by_css(browser, "#max_tokens")[0]
    box.clear()
    box.send_keys("100000")
    by_css(browser, "#prompt")[0].send_keys("Hello?")
    by_css(browser, "#send")[0].click()
    error = wait_for(
        browser, lambda d: [e for e in by_css(d, "#chat-error") if e.is_displayed()], "an error"
    )[0]
    assert error.text.startswith("400: max_tokens=100000 does not fit")
    assert by_css(browser, ".msg.assistant") == []
    assert page_server.request("GET", "/health")[0] == 200


def test_export_from_the_page_writes_the_artifact_and_shows_its_check(page_server, browser, runs_root):
    from selenium.webdriver.support.ui import Select

    browser.get(page_server.url + "/")
    wait_for(browser, lambda d: by_css(d, "#run-title")[0].text == "alpha", "the first run opens")
    Select(by_css(browser, "#export-kind")[0]).select_by_value("gguf")
    Select(by_css(browser, "#export-type")[0]).select_by_value("f32")
    by_css(browser, "#export-go")[0].click()
    status = wait_for(
        browser,
        lambda d: [
            s for s in by_css(d, "#export-status") if s.get_attribute("data-status") in ("done", "failed")
        ],
        "the export",
    )[0]
    assert status.get_attribute("data-status") == "done", status.text
    assert (runs_root / "alpha" / "exports" / "f32.gguf").is_file()
    assert "check: " in status.text and "greedy answer" in status.text
    screenshot(browser, "serve-export.png")


def test_a_training_runs_curve_grows_as_its_metrics_are_written(page_server, browser, runs_root):
    """A run directory as a training run leaves it midway (run.yaml and metrics.jsonl, no adapter yet),
    with alpha's records written a few at a time: the page marks it training and redraws the curve."""
    alpha = runs_root / "alpha"
    records = (alpha / "metrics.jsonl").read_text().splitlines(keepends=True)
    train_lines = [i for i, line in enumerate(records) if '"kind": "train"' in line]
    live = runs_root / "gamma"
    live.mkdir()
    shutil.copy(alpha / "run.yaml", live / "run.yaml")
    (live / "metrics.jsonl").write_text("".join(records[: train_lines[1] + 1]))
    try:
        browser.get(page_server.url + "/")
        wait_for(browser, lambda d: by_css(d, '#run-list li[data-run="gamma"]')[0].click() or True, "gamma")
        wait_for(browser, lambda d: points(d, "gamma", "train") == 2, "the first two steps")
        assert by_css(browser, "#run-state")[0].text == "training"
        with (live / "metrics.jsonl").open("a") as f:
            f.write("".join(records[train_lines[1] + 1 : train_lines[3] + 1]))
        wait_for(browser, lambda d: points(d, "gamma", "train") == 4, "two more steps, without a reload")
    finally:
        shutil.rmtree(live)
