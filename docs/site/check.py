"""Load every page of the built site (``make docs``) in headless Chromium, let its JavaScript run, and check
the rendered DOM: the page has its content, every formula typeset by KaTeX (no ``katex-error``, no ``$$``
left in the text outside code) and nothing is fetched from the network (the site works offline).
Writes a screenshot of one notebook page to ``build/site-screenshot.png``. Chromium: ``$CHROMIUM`` or
``/usr/bin/chromium`` (Debian package ``chromium``)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "build" / "site"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--hide-scrollbars"]


def browser() -> str:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        sys.exit("no Chromium found: install the Debian package `chromium` or set CHROMIUM=/path/to/chrome")
    return exe


def rendered(exe: str, page: Path) -> str:
    out = subprocess.run([exe, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    if out.returncode != 0 or not out.stdout:
        raise RuntimeError(f"{page}: chromium exited {out.returncode}: {out.stderr[-500:]}")
    return out.stdout


def text_outside_code(dom: str) -> str:
    dom = re.sub(r"<(script|style|pre|code|textarea)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    dom = re.sub(r'<span class="katex.*?</span>\s*</span>\s*</span>', " ", dom, flags=re.S)
    return re.sub(r"<[^>]+>", " ", dom)


def main() -> int:
    exe = browser()
    pages = [SITE / "index.html", SITE / "mathematics.html", *sorted((SITE / "notebooks").glob("*.html"))]
    missing = [p for p in pages[:2] if not p.exists()] or ([] if len(pages) > 2 else ["notebooks/*.html"])
    if missing:
        sys.exit(f"build the site first (make docs): missing {missing}")
    failures = []
    for page in pages:
        dom = rendered(exe, page)
        typeset = dom.count('class="katex"') + dom.count('class="katex-display"')
        errors = dom.count("katex-error")
        left = text_outside_code(dom).count("$$")
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', dom)
        ok = errors == 0 and left == 0 and not remote and (typeset > 0 or page.name == "index.html") \
            and len(dom) > 5000
        print(f"{'ok ' if ok else 'BAD'} {page.relative_to(SITE)}: {typeset} formulas typeset, {errors} KaTeX errors, "
              f"{left} unrendered $$, {len(remote)} remote resources")
        if not ok:
            failures.append(page.name)
    shot = REPO / "build" / "site-screenshot.png"
    subprocess.run([browser(), *FLAGS, "--window-size=1280,1600", f"--screenshot={shot}",
                    (SITE / "notebooks" / "evaluation.html").as_uri()], capture_output=True, timeout=180)
    print(f"screenshot: {shot.relative_to(REPO)}" if shot.exists() else "no screenshot written")
    if failures:
        print(f"{len(failures)} page(s) failed: {failures}")
        return 1
    print(f"all {len(pages)} pages load and their mathematics renders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
