"""Great Expectations Data Docs that render on a machine without internet: the scripts, styles and fonts its
pages load from CDNs are served from the site itself (copies of the same npm releases, flywheel/data/docs_assets),
and its links to the web become plain text."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ASSETS = Path(__file__).with_name("docs_assets")
# what GX 1.24's page templates load -> the copy here ("vega@5" and "vega-embed@6": the releases those resolved to)
CDN = {
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table-1.19.1.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table-1.19.1.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": (
        "bootstrap-table-filter-control-1.19.1.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": (
        "bootstrap-table-filter-control-1.19.1.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": (
        "bootstrap-table-filter-control-1.19.1.min.css"
    ),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker-1.9.0.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker-1.9.0.min.js"
    ),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": (
        "bootstrap-prefers-dark-1.1.0.min.css"
    ),
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper-1.12.9.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "css/fontawesome-6.6.0.all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega-5.33.1.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite-5.23.0.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed-6.29.0.min.js",
}
GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"  # GX's logo; the site has a copy
EXTERNAL = re.compile(r"https?://[^\s\"'<>)]+")


_STATIC_REF = re.compile(r'((?:src|href)=")((?:\.\./)*static/[^"]+)(")')


def _fixed(m: re.Match, page: Path, site: Path) -> str:
    """A reference to the site's ``static/`` folder that misses it (GX counts the folders of a validation page
    short by one: its favicon was a 404) made relative to where the page really is."""
    if (page.parent / m[2]).exists():
        return m[0]
    rest = m[2][m[2].index("static/") :]
    return m[1] + Path(os.path.relpath(site / rest, page.parent)).as_posix() + m[3]


def make_offline(site: Path) -> list[str]:
    """Rewrite every page of the Data Docs ``site`` to load only files of the site; returns the external URLs
    still referenced (none expected: a new GX release may add some, which the test names)."""
    target = site / "static" / "offline"
    shutil.copytree(ASSETS, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("LICENSES"))
    images = site / "static" / "images"
    left = set()
    for page in site.rglob("*.html"):
        rel = Path(os.path.relpath(target, page.parent)).as_posix()
        text = page.read_text(encoding="utf-8")
        for url in sorted(CDN, key=len, reverse=True):  # "vega-lite@5" before "vega@5"'s prefix could match
            text = text.replace(f'"{url}"', f'"{rel}/{CDN[url]}"')
        text = re.sub(r'\s(?:integrity|crossorigin)="[^"]*"', "", text)  # the copies' own hashes are in LICENSES
        if images.is_dir():
            text = text.replace(GX_IMAGES, Path(os.path.relpath(images, page.parent)).as_posix() + "/")
        text = _STATIC_REF.sub(lambda m, page=page: _fixed(m, page, site), text)
        # links to the web (GX's site, its newsletter) would not open offline: kept as text
        text = re.sub(r'<a\s[^>]*href="https?://[^"]*"[^>]*>(.*?)</a>', r"\1", text, flags=re.S)
        page.write_text(text, encoding="utf-8")
        left.update(EXTERNAL.findall(text))
    return sorted(left)
