"""Build plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so
that `dvc plots show` / `dvc plots diff` pages open offline (DVC's default page loads them from
a CDN). Needs npm once, to fetch the pinned packages from the npm registry:

    python plots/build_offline_template.py

.dvc/config points DVC at the result (`plots.html_template`). The libraries are BSD-3-Clause
(vega, vega-lite, vega-embed); their licence headers stay in the minified files.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": ("5.33.1", "build/vega.min.js"), "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.29.0", "build/vega-embed.min.js")}
OUT = Path(__file__).resolve().parent / "offline.html"


def main() -> None:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, path) in PACKAGES.items():
            tgz = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(Path(tmp) / tgz) as archive:
                member = archive.extractfile(f"package/{path}")
                assert member is not None
                js = member.read().decode("utf-8")
            assert "{plot_divs}" not in js and "{scripts}" not in js
            scripts.append(f"<!-- {name} {version} (BSD-3-Clause) -->\n<script>{js}</script>")
    page = ("<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<meta charset=\"utf-8\">\n<title>lmmem "
            "plots</title>\n"
            + "\n".join(scripts) + "\n<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n"
            "{plot_divs}\n</body>\n</html>\n")
    OUT.write_text(page, encoding="utf-8")
    print(f"{OUT}: {len(page.encode()) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
